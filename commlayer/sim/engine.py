"""The discrete-event core: message batches through FIFO queues, vectorized with numpy.

A message of ``n`` bytes from ``s`` to ``d`` becomes ready when its sender has processed what it
depends on (:mod:`commlayer.topologies.schedule`), then

1. waits for and occupies its queue for ``n / rate``: the directed link ``s -> d`` (``contention="link"``,
   the emulator's independent links, the adapt cost model's FIFO links) or the sender's access
   uplink then the receiver's access downlink (``contention="device"``: messages of one device share
   its uplink; many senders to one receiver share its downlink, cut-through);
2. propagates for the one-way delay plus a jitter sample (clipped at 0); a message whose last RTT
   of data suffers a loss arrives one RTT late (the relay pipe's retransmission stall); in device
   mode a message that waited longer than the sender's uplink buffer pays one more RTT (drop-tail);
3. is processed by the receiver's CPU in arrival order: ``msg_overhead_s`` plus the reduction
   (``reduce_Bps``) or copy (``copy_Bps``) of its bytes, the adapt cost model's
   :class:`~commlayer.topologies.cost.CostParams`.

Every queue is a FIFO scan (``finish_k = max(ready_k, finish_{k-1}) + service_k``) computed as a
cumulative maximum, so a batch of thousands of messages costs a few numpy calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from commlayer.sim.links import SimLinks
from commlayer.sim.rows import RowRun, fusable
from commlayer.wan.spec import TCP_MSS_BYTES
from commlayer.topologies.cost import CostParams
from commlayer.topologies.schedule import Step

CONTENTION = ("link", "device")


@dataclass(frozen=True)
class EngineConfig:
    """How the engine models the network.

    Attributes:
        params: CPU constants, shared with the adapt cost model.
        contention: "link" (independent directed links, as the emulator) or "device" (shared access links).
        jitter: sample per-message jitter.
        loss: model loss (Mathis rate cap is always in the link rates; this adds the stalls).
        seed: seed of the engine's private RNG.
    """

    params: CostParams = field(default_factory=CostParams)
    contention: str = "link"
    jitter: bool = True
    loss: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.contention not in CONTENTION:
            raise ValueError(f"Expected contention in {CONTENTION}, got {self.contention!r}")


def scan(ready: np.ndarray, service: np.ndarray, free0: np.ndarray) -> np.ndarray:
    """FIFO finish times along axis 1 of ``(Q, M)`` arrays; ``free0`` (Q,) is when each queue frees up."""
    if ready.shape[1] == 1:
        return np.maximum(ready, free0[:, None]) + service
    c = np.cumsum(service, axis=1)
    x = ready - (c - service)
    x[:, 0] = np.maximum(x[:, 0], free0)
    return np.maximum.accumulate(x, axis=1) + c


def fifo(keys: np.ndarray, ready: np.ndarray, service: np.ndarray, free: np.ndarray) -> np.ndarray:
    """FIFO finish times of flat messages sharing queues ``keys`` (served in ready order); updates ``free``."""
    if keys.size == 0:
        return ready.copy()
    order = np.lexsort((ready, keys))
    k = keys[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    counts = np.diff(np.r_[starts, k.size])
    seg = np.repeat(np.arange(starts.size), counts)
    pos = np.arange(k.size) - starts[seg]
    r = np.full((starts.size, int(counts.max())), -math.inf)
    s = np.zeros_like(r)
    r[seg, pos] = ready[order]
    s[seg, pos] = service[order]
    fin = scan(r, s, free[k[starts]])
    free[k[starts]] = fin[np.arange(starts.size), counts - 1]
    out = np.empty_like(ready)
    out[order] = fin[seg, pos]
    return out


class Engine:
    """Clocks and queues of one simulated world; :meth:`transfer` moves a batch, :meth:`run` a schedule."""

    def __init__(self, links: SimLinks, config: EngineConfig | None = None) -> None:
        self.links, self.cfg = links, config or EngineConfig()
        n = links.n
        self.rng = np.random.Generator(np.random.PCG64(self.cfg.seed))
        self.cpu = np.zeros(n)
        self.up_free = np.zeros(n)
        self.down_free = np.zeros(n)
        if self.cfg.contention == "link":
            if n > 2048:
                raise ValueError(f"contention='link' keeps an {n}x{n} link state; expected at most 2048 nodes, "
                                 "use contention='device' for fleet-scale worlds")
            self.link_free = np.zeros((n, n))
        self.sent = np.zeros(n)
        self.energy = np.zeros(n)
        self.messages = 0
        self._cache: dict[tuple[int, int], tuple[Any, ...]] = {}

    def _consts(self, src: np.ndarray, dst: np.ndarray) -> tuple[Any, ...]:
        """Per-message link constants, cached while a schedule reuses the same arrays (every ring step)."""
        key = (id(src), id(dst))
        hit = self._cache.get(key)
        if hit is not None and hit[0] is src and hit[1] is dst:
            return hit[2]
        s2 = np.broadcast_to(src[:, None], dst.shape)
        pp = self.links.pair(s2, dst)
        a = np.where(pp.loss > 0, np.log1p(-np.minimum(pp.loss, 0.999)) / TCP_MSS_BYTES, 0.0)
        lk = self.links
        consts = (s2, pp.delay_s, 1.0 / pp.rate_Bps, pp.jitter_s, pp.rtt_s, a, pp.rate_Bps * pp.rtt_s,
                  bool(np.any(pp.jitter_s > 0)), bool(np.any(pp.loss > 0)), 1.0 / lk.up_Bps[src][:, None],
                  1.0 / lk.down_Bps[dst], lk.queue_s[src][:, None], lk.energy_J_per_B[src])
        if len(self._cache) > 8:
            self._cache.clear()
        self._cache[key] = (src, dst, consts)
        return consts

    def transfer(self, st: Step, ready: np.ndarray, elem_scale: float = 1.0) -> np.ndarray:
        """Moves the messages of ``st`` that become ready at ``ready`` (G, M); returns when each is processed."""
        src, dst, p = st.src, st.dst, self.cfg.params
        mask = st.mask
        s2, delay, inv_rate, jit, rtt, loss_a, loss_cap, any_jit, any_loss, inv_up, inv_down, queue, energy = self._consts(src, dst)
        nb = st.nbytes.astype(float) if mask is None else np.where(mask, st.nbytes, 0).astype(float)
        if mask is not None:
            ready = np.where(mask, ready, -math.inf)
        ser = nb * inv_rate
        if self.cfg.contention == "link":
            if st.one_link:
                d0 = dst[:, 0]
                fin = scan(ready, ser, self.link_free[src, d0])
                self.link_free[src, d0] = fin[:, -1] if mask is None else fin.max(axis=1)
            else:
                fin = np.maximum(ready, self.link_free[s2, dst]) + ser
                m = np.ones(dst.shape, dtype=bool) if mask is None else mask
                self.link_free[s2[m], dst[m]] = fin[m]
            arrive = fin + delay
        else:
            up = nb * inv_up
            ufin = scan(ready, up, self.up_free[src])
            self.up_free[src] = np.maximum(self.up_free[src], ufin.max(axis=1))
            start = ufin - up
            late = (start - ready > queue) * rtt  # drop-tail: waited longer than the uplink buffer, retransmitted
            down = nb * inv_down
            if st.one_link:
                dfin = scan(start + delay, down, self.down_free[dst[:, 0]])
                self.down_free[dst[:, 0]] = dfin.max(axis=1)
            else:
                m = np.ones(dst.shape, dtype=bool) if mask is None else mask
                dfin = np.full(dst.shape, -math.inf)
                dfin[m] = fifo(dst[m], (start + delay)[m], down[m], self.down_free)
            # bits leave no faster than the pair rate and reach the receiver through its downlink
            arrive = np.maximum(np.maximum(ufin, start + ser) + delay, dfin) + late
        if self.cfg.jitter and any_jit:
            arrive = arrive + np.maximum(-delay, jit * self.rng.standard_normal(dst.shape))
        if self.cfg.loss and any_loss:  # P(stall) = 1 - (1 - loss)^segments, see pipe_stall_probability
            stall = self.rng.random(dst.shape) < -np.expm1(np.minimum(nb, loss_cap) * loss_a)
            arrive = arrive + stall * rtt
        work = {"reduce": elem_scale / p.reduce_Bps, "copy": 1.0 / p.copy_Bps, "none": 0.0}[st.work]
        svc = p.msg_overhead_s + nb * work
        if mask is not None:
            svc = np.where(mask, svc, 0.0)
            arrive = np.where(mask, arrive, -math.inf)
        if st.one_link:
            d0 = dst[:, 0]
            done = scan(arrive, svc, self.cpu[d0])
            self.cpu[d0] = done[:, -1] if mask is None else done.max(axis=1)
        else:
            m = np.ones(dst.shape, dtype=bool) if mask is None else mask
            done = np.full(dst.shape, -math.inf)
            done[m] = fifo(dst[m], arrive[m], svc[m], self.cpu)
        sent = nb.sum(axis=1)
        self.sent[src] += sent  # a sender appears in one row of a step
        self.energy[src] += sent * energy
        self.messages += dst.size if mask is None else int(mask.sum())
        return done

    def run(self, steps: Iterable[Step], start: np.ndarray, nodes: np.ndarray | None = None,
            elem_scale: float = 1.0, fuse: bool = True) -> np.ndarray:
        """Replays a schedule whose ranks are ``nodes`` (default: all), each starting at ``start`` (n,).

        Args:
            fuse: replay runs of steps on one (senders, receivers) pairing (ring and chain steps) in
                row space (:mod:`commlayer.sim.rows`): the same results; False moves every step
                through :meth:`transfer` (the reference the tests compare with).

        Returns:
            Per node (n,), when it has processed everything it received (``start`` if nothing).
        """
        done = np.array(start, dtype=float)[:, None].copy()
        base = done[:, 0].copy()
        phase = 0
        mapped: dict[tuple[int, int], tuple[np.ndarray, ...]] = {}
        chunk_of: tuple[np.ndarray | None, int, bool] = (None, 0, False)  # (chunk array, width, columns == chunk ids)
        last: tuple[int, int] | None = None  # the (src, dst) arrays of the previous fusable step
        run: RowRun | None = None
        for st in steps:
            key = (id(st.src), id(st.dst))
            if run is not None and (key != last or st.phase != phase or not fusable(st)):
                run.close()
                run = None
            if run is not None:
                run.step(st, elem_scale)
                continue
            if fuse and key == last and st.phase == phase and fusable(st):  # a second step on one pairing
                s, d = (st.src, st.dst[:, 0]) if nodes is None else (nodes[st.src], nodes[st.dst[:, 0]])
                run = RowRun(self, done, s, d)
                run.step(st, elem_scale)
                continue
            last = key if fusable(st) else None
            if st.phase != phase:  # a new loop starts once the earlier ones are done
                base = np.maximum(base, done.max(axis=1))
                done = np.maximum(done, base[:, None])
                phase = st.phase
            if nodes is not None:
                key = (id(st.src), id(st.dst))
                if key not in mapped:
                    mapped.clear()
                    mapped[key] = (st.src, nodes[st.src], nodes[st.dst])
                st = Step(mapped[key][1], mapped[key][2], st.nbytes, st.chunk, st.mask, st.work, st.one_link, st.phase)
            if chunk_of[0] is not st.chunk:
                m = st.chunk.shape[1]
                chunk_of = (st.chunk, int(st.chunk.max()) + 1, bool(np.array_equal(st.chunk, np.broadcast_to(np.arange(m), st.chunk.shape))))
            width = chunk_of[1]
            if width > done.shape[1]:
                done = np.concatenate([done, np.repeat(base[:, None], width - done.shape[1], axis=1)], axis=1)
            direct = st.one_link and chunk_of[2]  # chunk j of every row is column j: plain row slices
            m = st.chunk.shape[1]
            ready = done[st.src, :m] if direct else done[st.src[:, None], st.chunk]  # done >= base throughout
            fin = self.transfer(st, ready, elem_scale)
            if direct:
                d0 = st.dst[:, 0]
                done[d0, :m] = np.maximum(done[d0, :m], fin)
            elif st.one_link:  # (receiver, chunk) pairs are distinct
                done[st.dst, st.chunk] = np.maximum(done[st.dst, st.chunk], fin)
            else:
                mask = np.ones(st.dst.shape, dtype=bool) if st.mask is None else st.mask
                np.maximum.at(done, (st.dst[mask], st.chunk[mask]), fin[mask])
        if run is not None:
            run.close()
        return done.max(axis=1)
