"""Active link probes: RTT by ping-pong and bandwidth by a packet train, on every directed link.

A probe is collective: every rank of the group calls :func:`probe_links` with the same ``epoch``.

1. RTT: each rank sends ``pings`` rounds of PING to all peers; the peer's transport answers with a
   PONG without involving its application. The lower quartile of the rounds is the RTT (CPU
   scheduling delays on a busy host only ever add time; on jittery links this reads ~0.7 sd low).
2. Bandwidth: ``p - 1`` rounds; in round r group rank g sends a train to ``g + r`` and receives one
   from ``g - r`` (a permutation, so each rank uses one uplink and one downlink at a time, as a
   ring step does). The receiver asks for its train ("go", carrying the train's size) and times it
   (a helper thread sends this rank's own train, so the receiver is reading when its train
   arrives): if it was already waiting when the first message arrived, bandwidth = bytes after the
   first message / (last - first arrival) (packet-train dispersion); otherwise bytes / (time since
   go - RTT). A train shorter than ``train_s`` is dominated by scheduling noise on a busy host (a
   64 KiB message at 200 Mbit/s takes 2.6 ms, a time slice of a loaded core more): the receiver
   asks again with a train sized to last ``train_s`` at the rate just read, up to
   ``max_train_bytes`` and ``max_trains`` trains; the final size is sent twice and the faster of the
   trains that lasted at least ``train_s / 2`` is the reading (on a busy host scheduling delays only
   slow a train down; a short train can read a burst from a socket buffer as bandwidth). A reading
   whose longest train stayed shorter than ``train_s`` (the size cap was reached first: a link
   faster than ``max_train_bytes / train_s``, 670 Mbit/s by default), or during which the receiving
   process kept more than ``cpu_bound`` of a core busy or waited that long for one (a loaded host:
   the host may have set the pace), is marked a
   *lower bound* (the link may be faster than this host could measure):
   ``snapshot.meta["lower_bound"][i][j]``; the codec controller never compresses on one.
3. The per-rank results (outgoing RTTs, incoming bandwidths) are all-gathered, so every rank builds
   the same :class:`LinkMatrixSnapshot`.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

from commlayer.adapt.estimator import LinkMatrixSnapshot, LinkState
from commlayer.adapt.exchange import allgather_vector
from commlayer.transport.errors import CommTimeout
from commlayer.transport import envelope
from commlayer.transport.wire import Kind

logger = logging.getLogger(__name__)

#: A receive that returned faster than this found its message already queued.
_QUEUED_S = 2e-4


@dataclass(frozen=True)
class ProbeConfig:
    """Probe knobs.

    Attributes:
        pings: ping rounds per probe (median taken).
        train_bytes: bytes per bandwidth train.
        train_msgs: messages per train (>= 2; dispersion needs two).
        timeout: seconds for any wait.
        channel: transport channel reserved for probes.
        train_s: a train shorter than this is repeated, larger (fast links).
        max_train_bytes: the largest train.
        max_trains: trains per link and probe at most.
        cpu_bound: a reading during which this process used (or waited on a run queue for) more than this many CPU seconds per second
            (receiving, in all its threads) is only a lower bound: the host, not the link, may have set the pace.
    """

    pings: int = 5
    train_bytes: int = 512 * 1024
    train_msgs: int = 8
    timeout: float = 60.0
    channel: str = "__adapt_probe__"
    train_s: float = 0.2
    max_train_bytes: int = 16 << 20
    max_trains: int = 6
    cpu_bound: float = 0.3

    def __post_init__(self) -> None:
        if self.pings < 1 or self.train_msgs < 2 or self.train_bytes < self.train_msgs:
            raise ValueError(f"Expected pings >= 1, train_msgs >= 2 and train_bytes >= train_msgs, got {self}")
        if self.max_trains < 1 or self.max_train_bytes < self.train_bytes or self.train_s < 0:
            raise ValueError(f"Expected max_trains >= 1, max_train_bytes >= train_bytes and train_s >= 0, got {self}")


@dataclass(frozen=True)
class ProbeResult:
    """One probe: the agreed matrix, its RTT spread and how long it took on this rank."""

    snapshot: LinkMatrixSnapshot
    rtt_sd: tuple[tuple[float, ...], ...]
    seconds: float
    bytes_sent: int


def _seq(epoch: int, phase: int, k: int) -> int:
    return (epoch << 20) | (phase << 16) | k


def measure_rtts(transport: Any, ranks: Sequence[int], cfg: ProbeConfig, epoch: int) -> dict[int, list[float]]:
    """RTT samples (seconds) from this rank to every other rank of ``ranks``."""
    me = transport.rank
    peers = [r for r in ranks if r != me]
    samples: dict[int, list[float]] = {r: [] for r in peers}
    for k in range(cfg.pings):
        seq = _seq(epoch, 0, k)
        t0 = {}
        for r in peers:
            t0[r] = time.monotonic()
            transport.send(r, envelope.control(Kind.PING, cfg.channel, me, seq=seq, meta={"k": k}), [])
        for r in peers:
            transport.recv(cfg.channel, seq, 0, 0, r, cfg.timeout, f"probe ping #{k} to rank {r}")
            samples[r].append(time.monotonic() - t0[r])
    return samples


def _send_train(transport: Any, to: int, cfg: ProbeConfig, seq: int, errors: list[BaseException]) -> None:
    """Answers each of ``to``'s go messages with a train of the size it asks for; stops at size 0 (helper thread)."""
    try:
        for attempt in range(cfg.max_trains + 1):
            go = transport.recv(cfg.channel, seq, 0, attempt, to, cfg.timeout, f"probe go #{attempt} from rank {to}")
            nbytes = int(go.header.meta.get("bytes", 0))
            if nbytes <= 0:
                return
            payload = bytes(max(1, nbytes // cfg.train_msgs))
            for c in range(cfg.train_msgs):
                transport.send(to, envelope.data("probe-train", cfg.channel, seq, transport.rank, step=1 + attempt, chunk=c),
                               [payload])
    except BaseException as exc:  # reported by the caller
        errors.append(exc)


def _cpu_s() -> float:
    """CPU seconds this process ran plus seconds its threads waited on a run queue (Linux schedstat):
    either way the host, not the link, was setting the pace. Every thread, the transport's I/O thread too."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    waited = 0
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                waited += int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        pass  # no schedstat here: CPU time alone
    return ru.ru_utime + ru.ru_stime + waited / 1e9


def _one_train(transport: Any, frm: int, cfg: ProbeConfig, seq: int, attempt: int, nbytes: int,
               rtt_frm: float) -> tuple[float, float, float]:
    """Asks ``frm`` for a train of ``nbytes`` and times it: (bytes/s, seconds the train took, CPU seconds
    this process spent per second meanwhile)."""
    ch = cfg.channel
    size = max(1, nbytes // cfg.train_msgs)
    cpu0 = _cpu_s()
    t_go = time.monotonic()
    transport.send(frm, envelope.data("probe-go", ch, seq, transport.rank, chunk=attempt, meta={"bytes": nbytes}), [])
    arrivals: list[float] = []
    first_waited = False
    for c in range(cfg.train_msgs):
        t = time.monotonic()
        transport.recv(ch, seq, 1 + attempt, c, frm, cfg.timeout, f"probe train {attempt}.{c} from rank {frm}")
        now = time.monotonic()
        if c == 0:
            first_waited = now - t > _QUEUED_S
        arrivals.append(now)
    busy = (_cpu_s() - cpu0) / max(arrivals[-1] - t_go, 1e-6)
    disp = arrivals[-1] - arrivals[0]
    if first_waited and disp > 0:
        return size * (cfg.train_msgs - 1) / disp, disp, busy
    span = arrivals[-1] - t_go - rtt_frm
    return (size * cfg.train_msgs / span if span > 0 else math.inf), max(span, 0.0), busy


def _train_round(transport: Any, to: int, frm: int, cfg: ProbeConfig, epoch: int, rnd: int,
                 rtt_frm: float) -> tuple[float, bool, int]:
    """One bandwidth round: send trains to ``to`` as it asks, time trains from ``frm``.

    Returns (B/s of the last train, whether that is only a lower bound, bytes received). Sending
    runs on a helper thread so this thread is already reading when a train arrives, whatever the
    other ranks' progress (a late reader would see the train as one burst).
    """
    me = transport.rank
    seq = _seq(epoch, 1, rnd)
    errors: list[BaseException] = []
    sender = threading.Thread(target=_send_train, args=(transport, to, cfg, seq, errors), name=f"probe-send-{me}", daemon=True)
    sender.start()
    nbytes, got, rates, spans, busy = cfg.train_bytes, 0, [], [], 0.0
    repeat = False
    try:
        for attempt in range(cfg.max_trains):
            rate, span, busy = _one_train(transport, frm, cfg, seq, attempt, nbytes, rtt_frm)
            got += nbytes
            rates.append(rate)
            spans.append(span)
            if repeat or not math.isfinite(rate):
                break
            if span >= cfg.train_s or nbytes >= cfg.max_train_bytes:
                repeat = True  # once more at this size: scheduling delays only slow a train down, keep the faster
                continue
            nbytes = min(cfg.max_train_bytes, int(nbytes * min(16.0, max(2.0, 1.3 * cfg.train_s / max(span, 1e-4)))))
        transport.send(frm, envelope.data("probe-go", cfg.channel, seq, me, chunk=len(rates), meta={"bytes": 0}), [])
    finally:
        sender.join(cfg.timeout)
    if errors:
        raise errors[0]
    if sender.is_alive():
        raise CommTimeout(f"probe: rank {to} did not ask for its trains within {cfg.timeout:.0f} s")
    logger.debug("trains from rank %d: %s Mbit/s over %s s, receiver busy %.2f", frm, [round(r * 8e-6, 1) for r in rates],
                 [round(x, 3) for x in spans], busy)
    long = [r for r, sp in zip(rates, spans) if sp >= cfg.train_s / 2]  # short trains can read bursts as bandwidth
    reading = max(long) if long else rates[-1]
    lower = max(spans) < cfg.train_s or busy > cfg.cpu_bound  # at the size cap and still short, or the host set the pace
    return reading, lower, got


def probe_links(transport: Any, ranks: Sequence[int], cfg: ProbeConfig | None = None, epoch: int = 1,
                state: LinkState | None = None, bandwidth: bool = True) -> ProbeResult:
    """Measures every directed link among ``ranks`` (global ranks); collective.

    Args:
        transport: this rank's connected transport.
        ranks: global ranks of the group, in group order.
        cfg: probe knobs.
        epoch: probe number, the same on every rank (keeps probes apart on the wire).
        state: if given, receives the results (indexed by group rank).
        bandwidth: False measures RTT only (bandwidths reported as inf).

    Returns:
        The matrix in group-rank indices, identical on every rank.
    """
    cfg = cfg or ProbeConfig()
    t_start = time.monotonic()
    p = len(ranks)
    g = list(ranks).index(transport.rank)
    # start together: a peer that is not yet inside the probe answers pings late (its I/O thread
    # takes over the socket only after a grace period)
    allgather_vector(transport, ranks, cfg.channel, _seq(epoch, 3, 0), [float(epoch)], cfg.timeout, op="probe-start")
    samples = measure_rtts(transport, ranks, cfg, epoch)
    if bandwidth:  # no train may start while a peer still pings: trains queue in front of its pings (emulators, modems)
        allgather_vector(transport, ranks, cfg.channel, _seq(epoch, 4, 0), [float(epoch)], cfg.timeout, op="probe-rtt-done")
    rtt_row = [0.0] * p
    sd_row = [0.0] * p
    for r, xs in samples.items():
        rtt_row[ranks.index(r)] = sorted(xs)[len(xs) // 4]  # lower quartile: scheduling delays only add
        sd_row[ranks.index(r)] = statistics.pstdev(xs) if len(xs) > 1 else 0.0
    bw_col = [math.inf] * p  # bandwidth of links INTO this rank
    lb_col = [0.0] * p  # 1.0: that bandwidth is only a lower bound
    sent = 0
    if bandwidth:
        for rnd in range(1, p):
            to, frm = (g + rnd) % p, (g - rnd) % p
            bw, lower, got = _train_round(transport, ranks[to], ranks[frm], cfg, epoch, rnd, rtt_row[frm])
            bw_col[frm], lb_col[frm] = bw, 1.0 if lower else 0.0
            sent += got
    rows = allgather_vector(transport, ranks, cfg.channel, _seq(epoch, 2, 0), rtt_row + sd_row + bw_col + lb_col, cfg.timeout,
                            op="probe-result")
    rtt = [r[:p] for r in rows]
    sd = [r[p:2 * p] for r in rows]
    alpha = [[0.0 if i == j else (rtt[i][j] + rtt[j][i]) / 4.0 for j in range(p)] for i in range(p)]
    # rows[j][2p + i] is bandwidth i -> j as measured by receiver j
    beta = [[math.inf if i == j else rows[j][2 * p + i] for j in range(p)] for i in range(p)]
    snap = LinkMatrixSnapshot.from_lists(alpha, beta, epoch)
    snap.meta["lower_bound"] = tuple(tuple(i != j and rows[j][3 * p + i] > 0.5 for j in range(p)) for i in range(p))
    if state is not None:
        for i in range(p):
            for j in range(p):
                if i != j:
                    state.set_probe(ranks[i], ranks[j], 2 * alpha[i][j], beta[i][j] if bandwidth else math.nan, (sd[i][j] + sd[j][i]) / 2)
    sd_t = tuple(tuple(x) for x in sd)
    seconds = time.monotonic() - t_start
    logger.info("probe epoch %d on rank %d: %.3f s, %s", epoch, transport.rank, seconds, _fmt(snap))
    return ProbeResult(snap, sd_t, seconds, sent)


def _fmt(s: LinkMatrixSnapshot) -> str:
    p = s.size
    return "; ".join(f"{i}->{j} {s.alpha[i][j] * 1e3:.1f} ms {s.beta[i][j] * 8e-6:.1f} Mbit/s"
                     for i in range(p) for j in range(p) if i != j)
