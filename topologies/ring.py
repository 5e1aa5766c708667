"""Chunked, pipelined ring: reduce-scatter, all-gather and their composition, all-reduce.

Patarasuk & Yuan, "Bandwidth optimal all-reduce algorithms for clusters of workstations"
(JPDC 2009). Each rank sends 2(p-1)/p of the data, the bandwidth optimum. Blocks are cut into
chunks, and a chunk is forwarded as soon as it is reduced, so every link stays busy and a long
fat link can hold many chunks in flight. The ring may follow any order (a permutation of the
group ranks), so the adaptation layer can route around slow links. :func:`ring_allreduce_time`
replays the same schedule over a link matrix (the registry's cost of "ring").
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from commlayer.topologies.comm import OpComm
from commlayer.topologies.cost import CostParams, Links, chunking, framing
from commlayer.topologies.reduce_ops import ReduceOp, combine_
from commlayer.topologies.schedule import Step

DEFAULT_CHUNK_BYTES = 1 << 20


def _chunks(lo: int, hi: int, chunk: int) -> Iterator[tuple[int, int, int]]:
    j = 0
    a = lo
    while a < hi:
        b = min(hi, a + chunk)
        yield j, a, b
        j += 1
        a = b


def even_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """Splits ``n`` elements into ``parts`` contiguous blocks differing by at most one element."""
    q, r = divmod(n, parts)
    out, lo = [], 0
    for i in range(parts):
        hi = lo + q + (1 if i < r else 0)
        out.append((lo, hi))
        lo = hi
    return out


class _Ring:
    def __init__(self, comm: OpComm, flat: torch.Tensor, bounds: Sequence[tuple[int, int]], order: Sequence[int] | None,
                 chunk_bytes: int) -> None:
        p = comm.size
        self.order = list(order) if order is not None else list(range(p))
        if sorted(self.order) != list(range(p)):
            raise ValueError(f"Expected the ring order to be a permutation of range({p}), got {self.order}")
        if len(bounds) != p:
            raise ValueError(f"Expected {p} blocks, got {len(bounds)}")
        self.comm, self.flat, self.p = comm, flat, p
        self.pos = self.order.index(comm.rank)
        self.nxt = self.order[(self.pos + 1) % p]
        self.prv = self.order[(self.pos - 1) % p]
        # Blocks are indexed by ring position: position k ends the reduce-scatter owning group rank order[k]'s block.
        self.blocks = [bounds[self.order[k]] for k in range(p)]
        self.chunk = max(1, chunk_bytes // max(1, flat.element_size()))

    def block(self, k: int) -> tuple[int, int]:
        return self.blocks[k % self.p]

    def send_block(self, step: int, k: int) -> None:
        lo, hi = self.block(k)
        for j, a, b in _chunks(lo, hi, self.chunk):
            self.comm.send_tensor(self.nxt, step, self.flat[a:b], chunk=j)

    def recv_chunks(self, step: int, k: int) -> Iterator[tuple[int, int, int, torch.Tensor]]:
        lo, hi = self.block(k)
        for j, a, b in _chunks(lo, hi, self.chunk):
            yield j, a, b, self.comm.recv_tensor(self.prv, step, self.flat.dtype, b - a, chunk=j)

    def reduce_scatter(self, op: ReduceOp, then_allgather: bool) -> None:
        p, pos, flat = self.p, self.pos, self.flat
        self.send_block(0, pos - 1)
        for s in range(p - 1):
            last = s == p - 2
            for j, a, b, t in self.recv_chunks(s, pos - s - 2):
                combine_(flat[a:b], t, op)
                if not last or then_allgather:
                    self.comm.send_tensor(self.nxt, s + 1, flat[a:b], chunk=j)

    def allgather(self, step0: int, send_first: bool) -> None:
        p, pos, flat = self.p, self.pos, self.flat
        if send_first:
            self.send_block(step0, pos)
        for s in range(p - 1):
            for j, a, b, t in self.recv_chunks(step0 + s, pos - s - 1):
                flat[a:b].copy_(t)
                if s < p - 2:
                    self.comm.send_tensor(self.nxt, step0 + s + 1, flat[a:b], chunk=j)


def ring_allreduce(comm: OpComm, flat: torch.Tensor, op: ReduceOp, order: Sequence[int] | None = None,
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
    """All-reduces the 1-D contiguous ``flat`` in place (AVG is left as a SUM; the caller divides)."""
    if comm.size == 1 or flat.numel() == 0:
        comm.finish()  # an empty call exchanges only fingerprints (see OpComm.declare)
        return
    ring = _Ring(comm, flat, even_bounds(flat.numel(), comm.size), order, chunk_bytes)
    ring.reduce_scatter(op, then_allgather=True)
    ring.allgather(comm.size - 1, send_first=False)
    comm.finish()


def ring_reduce_scatter(comm: OpComm, flat: torch.Tensor, op: ReduceOp, bounds: Sequence[tuple[int, int]],
                        order: Sequence[int] | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
    """Reduces ``flat`` so that this rank's block ``bounds[comm.rank]`` holds the reduction over all ranks.

    Other blocks are left with partial sums.
    """
    comm.declare(count=flat.numel(), dtype=flat.dtype, redop=op)
    if comm.size == 1:
        return
    ring = _Ring(comm, flat, bounds, order, chunk_bytes)
    ring.reduce_scatter(op, then_allgather=False)
    comm.finish()


def ring_allgather(comm: OpComm, flat: torch.Tensor, bounds: Sequence[tuple[int, int]], order: Sequence[int] | None = None,
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
    """Fills every block of ``flat`` from its owner: rank r contributes ``flat[bounds[r]]``."""
    comm.declare(count=flat.numel(), dtype=flat.dtype)
    if comm.size == 1:
        return
    ring = _Ring(comm, flat, bounds, order, chunk_bytes)
    ring.allgather(0, send_first=True)
    comm.finish()


# ---- schedule: what the code above sends (tests/test_sim_schedule.py checks it against real sends) -----
RING_PHASES = ("allreduce", "reduce_scatter", "allgather")


def ring_schedule(size: int, numel: int, elem_size: int, order: Sequence[int] | None = None,
                  chunk_bytes: int = DEFAULT_CHUNK_BYTES, phase: str = "allreduce",
                  bounds: Sequence[tuple[int, int]] | None = None) -> Iterator[Step]:
    """The ring's steps: in step ``t`` the rank at ring position ``k`` sends the chunks of block
    ``k - t - 1`` (``k - t`` in an all-gather) to position ``k + 1``.

    Args:
        size: ranks. numel: elements of the flat tensor. elem_size: bytes per element.
        order: ring order (a permutation of ``range(size)``; identity if None).
        chunk_bytes: chunk size, as :func:`ring_allreduce`.
        phase: "allreduce" (2(p-1) steps), "reduce_scatter" or "allgather" (p-1 steps each).
        bounds: element range of each rank's block (default :func:`even_bounds`).
    """
    if phase not in RING_PHASES:
        raise ValueError(f"Expected phase in {RING_PHASES}, got {phase!r}")
    p = size
    if p <= 1 or numel == 0:
        return
    order = list(order) if order is not None else list(range(p))
    if sorted(order) != list(range(p)):
        raise ValueError(f"Expected the ring order to be a permutation of range({p}), got {order}")
    bounds = even_bounds(numel, p) if bounds is None else bounds
    chunk = max(1, chunk_bytes // max(1, elem_size))
    lens = np.array([bounds[order[k]][1] - bounds[order[k]][0] for k in range(p)], dtype=np.int64)
    m = max(1, int(-(-lens.max() // chunk)))
    starts = np.arange(m, dtype=np.int64) * chunk
    sizes = np.clip(lens[:, None] - starts[None, :], 0, chunk) * elem_size  # (block, chunk) bytes
    valid = sizes > 0
    full = bool(valid.all())
    src = np.asarray(order, dtype=np.int64)
    dst = np.broadcast_to(np.roll(src, -1)[:, None], (p, m))
    chunks = np.broadcast_to(np.arange(m, dtype=np.int64)[None, :], (p, m))
    steps = 2 * (p - 1) if phase == "allreduce" else p - 1
    shift = 0 if phase == "allgather" else 1
    sizes2, valid2 = np.concatenate([sizes, sizes]), np.concatenate([valid, valid])  # block (k - s) % p: rows o..o+p
    for t in range(steps):
        o = (-t - shift) % p
        work = "reduce" if phase == "reduce_scatter" or (phase == "allreduce" and t < p - 1) else "copy"
        yield Step(src, dst, sizes2[o:o + p], chunks, None if full else valid2[o:o + p], work=work, one_link=True)


# ---- cost: the schedule above replayed over per-link alpha/beta ----------------------------------
def ring_time(s: Links, nbytes: float, order: Sequence[int], chunk_bytes: int, params: CostParams,
              steps: int | None = None, reduce_steps: int | None = None, elem_scale: float = 1.0) -> float:
    """Seconds for a chunked, pipelined ring over ``order`` moving blocks of ``nbytes / p``.

    ``steps`` defaults to the all-reduce's 2(p-1) (an all-gather is p-1 with no reductions);
    ``reduce_steps`` of them combine what they receive. ``elem_scale`` scales reduction cost.
    """
    p = len(order)
    if p <= 1 or nbytes <= 0:
        return 0.0
    S = 2 * (p - 1) if steps is None else steps
    R = (p - 1) if reduce_steps is None else reduce_steps
    K, c, o = chunking(nbytes / p, chunk_bytes, params)
    links = [(order[k], order[(k + 1) % p]) for k in range(p)]
    wire = c + framing(nbytes / p, chunk_bytes, params)  # each message's framing rides the link too
    ser = [wire / s.beta[a][b] for a, b in links]
    lat = [s.alpha[a][b] for a, b in links]
    red = c * elem_scale / params.reduce_Bps
    cpy = c / params.copy_Bps
    cpu = [0.0] * p        # rank order[k]'s thread clock
    free = [0.0] * p       # link k (order[k] -> order[k+1]) busy until
    arrive = [[0.0] * K for _ in range(p)]
    for k in range(p):     # step 0: every rank sends its first block at once
        for j in range(K):
            free[k] = max(free[k], cpu[k]) + ser[k]
            arrive[k][j] = free[k] + lat[k]
    for step in range(1, S + 1):
        prev = arrive
        arrive = [[0.0] * K for _ in range(p)]
        for k in range(p):
            up = prev[(k - 1) % p]  # what rank order[k] receives from order[k-1]
            for j in range(K):
                cpu[k] = max(cpu[k], up[j]) + o + (red if step <= R else cpy)
                if step < S:
                    free[k] = max(free[k], cpu[k]) + ser[k]
                    arrive[k][j] = free[k] + lat[k]
    return max(cpu)


def ring_allreduce_time(s: Links, nbytes: float, order: Sequence[int] | None, chunk_bytes: int,
                        params: CostParams, elem_scale: float = 1.0) -> float:
    order = list(range(s.size)) if order is None else list(order)
    return ring_time(s, nbytes, order, chunk_bytes, params, elem_scale=elem_scale)


def ring_allgather_time(s: Links, block_bytes: float, order: Sequence[int] | None, chunk_bytes: int,
                        params: CostParams) -> float:
    """All-gather of one ``block_bytes`` block per rank over a ring."""
    order = list(range(s.size)) if order is None else list(order)
    p = len(order)
    return ring_time(s, block_bytes * p, order, chunk_bytes, params, steps=p - 1, reduce_steps=0)
