"""Link estimates: EWMA with variance, the link-state matrix and passive measurement hooks.

Two kinds of evidence feed the matrix:

* active probes (:mod:`commlayer.adapt.probe`): RTT by ping-pong and bandwidth by a packet train,
  per directed link; these are the link's capacity;
* passive samples from every real transfer (the transport's ``on_send`` / ``on_recv`` hooks): bytes
  and seconds per message. The latency part (the link's one-way latency estimate) is subtracted
  before a bandwidth sample is taken, and only messages large enough for serialisation to dominate
  count. Waits inside a collective also contain upstream skew, so passive samples are an *achieved*
  bandwidth (a lower bound of the capacity); the controller uses them to detect drift and then
  re-probes actively.

Smoothing is an exponentially weighted mean and variance (West 1979 / Finch 2009 incremental form)
over *seconds per byte*, so a rate drop moves the estimate within one or two samples.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

logger = logging.getLogger(__name__)

#: Passive samples below this many bytes carry too little serialisation time to measure bandwidth.
PASSIVE_MIN_BYTES = 32 * 1024


@dataclass
class Ewma:
    """Exponentially weighted mean and variance.

    Attributes:
        weight: weight of a new sample in (0, 1].
        mean: current mean (nan before the first sample).
        var: current variance.
        n: samples seen.
        t_last: ``time.monotonic()`` of the last update (0 = never).
    """

    weight: float = 0.5
    mean: float = math.nan
    var: float = 0.0
    n: int = 0
    t_last: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.weight <= 1.0:
            raise ValueError(f"Expected an EWMA weight in (0, 1], got {self.weight}")

    def update(self, x: float, now: float | None = None) -> None:
        """Adds sample ``x``."""
        if not math.isfinite(x):
            return
        if self.n == 0:
            self.mean, self.var = x, 0.0
        else:
            d = x - self.mean
            incr = self.weight * d
            self.mean += incr
            self.var = (1.0 - self.weight) * (self.var + d * incr)
        self.n += 1
        self.t_last = time.monotonic() if now is None else now

    def reset(self, x: float, now: float | None = None) -> None:
        """Forgets history and restarts from ``x`` (used after an active probe)."""
        self.n = 0
        self.update(x, now)

    @property
    def std(self) -> float:
        return math.sqrt(max(0.0, self.var))

    def age(self, now: float | None = None) -> float:
        """Seconds since the last update (inf if never updated)."""
        if self.n == 0:
            return math.inf
        return (time.monotonic() if now is None else now) - self.t_last


@dataclass(frozen=True)
class LinkEstimate:
    """What is known about directed link src -> dst.

    Attributes:
        latency_s: one-way latency (half the RTT).
        latency_sd: its standard deviation.
        bandwidth_Bps: bytes per second.
        bandwidth_sd: its standard deviation.
        age_s: seconds since the last sample.
        samples: samples behind the bandwidth estimate.
        source: "probe", "passive" or "none".
    """

    src: int
    dst: int
    latency_s: float
    latency_sd: float
    bandwidth_Bps: float
    bandwidth_sd: float
    age_s: float
    samples: int
    source: str

    def as_dict(self) -> dict[str, Any]:
        return {"src": self.src, "dst": self.dst, "latency_ms": self.latency_s * 1e3, "latency_sd_ms": self.latency_sd * 1e3,
                "bandwidth_mbit": self.bandwidth_Bps * 8e-6, "bandwidth_sd_mbit": self.bandwidth_sd * 8e-6,
                "age_s": self.age_s if math.isfinite(self.age_s) else None, "samples": self.samples, "source": self.source}


@dataclass
class _Link:
    rtt: Ewma
    spb: Ewma  # seconds per byte, from probes (reset on each probe) and passive samples
    passive: Ewma  # achieved seconds per byte from real transfers only
    source: str = "none"
    bytes_sent: int = 0
    bytes_recv: int = 0
    send_s: float = 0.0
    recv_s: float = 0.0
    msgs_sent: int = 0
    msgs_recv: int = 0


class LinkState:
    """The link-state matrix of one rank: estimates of every directed link of a ``world_size`` world.

    Thread-safe; hook callbacks are O(1).

    Args:
        rank: this process's rank (passive samples concern links into and out of it).
        world_size: number of ranks.
        weight: EWMA weight of a new sample.
    """

    def __init__(self, rank: int, world_size: int, weight: float = 0.5) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"Expected 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.rank, self.world_size, self.weight = rank, world_size, weight
        self._lock = threading.Lock()
        self._links = {(i, j): _Link(Ewma(weight), Ewma(weight), Ewma(weight))
                       for i in range(world_size) for j in range(world_size) if i != j}

    def _link(self, src: int, dst: int) -> _Link:
        try:
            return self._links[(src, dst)]
        except KeyError:
            raise ValueError(f"Expected a link src != dst in [0, {self.world_size}), got {src}->{dst}") from None

    # ---- active evidence ---------------------------------------------------------------------
    def set_probe(self, src: int, dst: int, rtt_s: float, bandwidth_Bps: float, rtt_sd: float = 0.0) -> None:
        """Installs an active probe result; history is replaced (probes measure capacity)."""
        with self._lock:
            lk = self._link(src, dst)
            lk.rtt.reset(rtt_s)
            lk.rtt.var = rtt_sd ** 2
            if bandwidth_Bps > 0 and math.isfinite(bandwidth_Bps):
                lk.spb.reset(1.0 / bandwidth_Bps)
            lk.source = "probe"

    # ---- passive evidence --------------------------------------------------------------------
    def on_recv(self, peer: int, nbytes: int, seconds: float) -> None:
        """Transport hook: a message of ``nbytes`` from ``peer`` arrived after waiting ``seconds``."""
        if peer == self.rank:
            return
        with self._lock:
            lk = self._link(peer, self.rank)
            lk.bytes_recv += nbytes
            lk.recv_s += seconds
            lk.msgs_recv += 1
            if nbytes >= PASSIVE_MIN_BYTES and seconds > 0:
                lat = lk.rtt.mean / 2 if lk.rtt.n else 0.0
                busy = seconds - lat if seconds > 2 * lat else seconds / 2
                lk.passive.update(busy / nbytes)

    def on_send(self, peer: int, nbytes: int, seconds: float) -> None:
        """Transport hook: ``nbytes`` to ``peer`` were queued in ``seconds``."""
        if peer == self.rank:
            return
        with self._lock:
            lk = self._link(self.rank, peer)
            lk.bytes_sent += nbytes
            lk.send_s += seconds
            lk.msgs_sent += 1

    # ---- reading -------------------------------------------------------------------------------
    def estimate(self, src: int, dst: int, now: float | None = None) -> LinkEstimate:
        with self._lock:
            lk = self._link(src, dst)
            spb, sd = lk.spb.mean, lk.spb.std
            bw = 1.0 / spb if lk.spb.n and spb > 0 else math.nan
            # delta method: sd(1/x) ~ sd(x) / x^2
            bw_sd = sd / (spb * spb) if lk.spb.n and spb > 0 else math.nan
            return LinkEstimate(src, dst, lk.rtt.mean / 2 if lk.rtt.n else math.nan, lk.rtt.std / 2, bw, bw_sd,
                                min(lk.rtt.age(now), lk.spb.age(now)), lk.spb.n, lk.source)

    def estimates(self) -> list[LinkEstimate]:
        now = time.monotonic()
        return [self.estimate(i, j, now) for (i, j) in sorted(self._links)]

    def achieved_Bps(self, src: int, dst: int) -> float:
        """Smoothed achieved bandwidth of real transfers on src->dst (nan if none seen here)."""
        with self._lock:
            p = self._link(src, dst).passive
            return 1.0 / p.mean if p.n and p.mean > 0 else math.nan

    def counters(self) -> list[dict[str, Any]]:
        """Per-link byte/message/time counters of this rank's own transfers."""
        with self._lock:
            out = []
            for (i, j), lk in sorted(self._links.items()):
                if self.rank not in (i, j) or not (lk.msgs_sent or lk.msgs_recv):
                    continue
                ach = 1.0 / lk.passive.mean if lk.passive.n and lk.passive.mean > 0 else None
                out.append({"src": i, "dst": j, "bytes_sent": lk.bytes_sent, "bytes_recv": lk.bytes_recv,
                            "msgs_sent": lk.msgs_sent, "msgs_recv": lk.msgs_recv, "send_s": lk.send_s,
                            "recv_wait_s": lk.recv_s, "achieved_mbit": None if ach is None else ach * 8e-6})
            return out


def install_hooks(transport: Any, state: LinkState) -> Callable[[], None]:
    """Adds observers feeding ``state`` to the transport's observer lists; returns a function that removes them.

    Observers added by others stay (every observer sees every sample).
    """
    transport.add_observer(on_send=state.on_send, on_recv=state.on_recv)

    def uninstall() -> None:
        transport.remove_observer(on_send=state.on_send, on_recv=state.on_recv)

    return uninstall


@dataclass(frozen=True)
class LinkMatrixSnapshot:
    """An immutable, rank-independent view of every link: what plans are computed from.

    Built from all-gathered measurements, so every rank holds bit-identical values.

    Attributes:
        alpha: ``alpha[i][j]`` one-way latency of i->j in seconds (0 on the diagonal).
        beta: ``beta[i][j]`` bandwidth of i->j in bytes/s (inf on the diagonal).
        epoch: probe epoch it came from.
    """

    alpha: tuple[tuple[float, ...], ...]
    beta: tuple[tuple[float, ...], ...]
    epoch: int = 0
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def size(self) -> int:
        return len(self.alpha)

    def as_dict(self) -> dict[str, Any]:
        p = self.size
        return {"epoch": self.epoch, "links": [
            {"src": i, "dst": j, "latency_ms": self.alpha[i][j] * 1e3, "bandwidth_mbit": self.beta[i][j] * 8e-6}
            for i in range(p) for j in range(p) if i != j]}

    @classmethod
    def uniform(cls, p: int, latency_s: float, bandwidth_Bps: float) -> "LinkMatrixSnapshot":
        return cls.from_lists([[0.0 if i == j else latency_s for j in range(p)] for i in range(p)],
                              [[math.inf if i == j else bandwidth_Bps for j in range(p)] for i in range(p)])

    @classmethod
    def from_lists(cls, alpha: list[list[float]], beta: list[list[float]], epoch: int = 0) -> "LinkMatrixSnapshot":
        p = len(alpha)
        if len(beta) != p or any(len(r) != p for r in alpha) or any(len(r) != p for r in beta):
            raise ValueError(f"Expected two {p}x{p} matrices, got {len(alpha)} and {len(beta)} rows")
        return cls(tuple(tuple(float(x) for x in r) for r in alpha), tuple(tuple(float(x) for x in r) for r in beta), epoch)
