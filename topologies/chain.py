"""Chain (pipelined path) all-reduce: reduce down a path of ranks, then broadcast back up it.

The tensor is cut into chunks that flow along the path ``order[0] -> order[1] -> ... -> order[p-1]``;
each rank adds its own chunk and forwards it at once, so every link of the path is busy at the same
time (the pipelined chain of the rooted collectives, :func:`tree.chain_broadcast`, run twice). The
last rank of the path holds the full reduction and sends it back down the path, so every rank ends
with its bits. Each link carries the tensor once per direction: the choice for a line of sites
(a WAN chain) where the ring's wrap-around link would cross the slowest hop.

:func:`chain_allreduce_time` replays the same schedule over per-link alpha/beta (the registry's cost).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from commlayer.topologies.comm import OpComm
from commlayer.topologies.cost import CostParams, Links, chunking, framing
from commlayer.topologies.reduce_ops import ReduceOp, combine_
from commlayer.topologies.ring import DEFAULT_CHUNK_BYTES, _chunks
from commlayer.topologies.schedule import Step

_REDUCE, _BCAST = 0, 1  # steps of the two phases


def _path(size: int, order: Sequence[int] | None) -> list[int]:
    path = list(order) if order is not None else list(range(size))
    if sorted(path) != list(range(size)):
        raise ValueError(f"Expected the chain order to be a permutation of range({size}), got {path}")
    return path


def chain_allreduce(comm: OpComm, flat: torch.Tensor, op: ReduceOp, order: Sequence[int] | None = None,
                    chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
    """All-reduces the 1-D contiguous ``flat`` in place (AVG is left as a SUM; the caller divides)."""
    p = comm.size
    if p == 1 or flat.numel() == 0:
        comm.finish()  # an empty call exchanges only fingerprints (see OpComm.declare)
        return
    path = _path(p, order)
    pos = path.index(comm.rank)
    prv = path[pos - 1] if pos > 0 else None
    nxt = path[pos + 1] if pos < p - 1 else None
    chunk = max(1, chunk_bytes // max(1, flat.element_size()))
    for j, a, b in _chunks(0, flat.numel(), chunk):
        if prv is not None:
            combine_(flat[a:b], comm.recv_tensor(prv, _REDUCE, flat.dtype, b - a, chunk=j), op)
        if nxt is not None:
            comm.send_tensor(nxt, _REDUCE, flat[a:b], chunk=j, copy=True)  # overwritten by the broadcast below
    for j, a, b in _chunks(0, flat.numel(), chunk):
        if nxt is not None:
            flat[a:b].copy_(comm.recv_tensor(nxt, _BCAST, flat.dtype, b - a, chunk=j))
        if prv is not None:
            comm.send_tensor(prv, _BCAST, flat[a:b], chunk=j)
    comm.finish()


def chain_schedule(size: int, numel: int, elem_size: int, order: Sequence[int] | None = None,
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[Step]:
    """What :func:`chain_allreduce` sends: step i, path[i] -> path[i+1] (reduce); then back up the path (broadcast)."""
    p = size
    if p <= 1 or numel == 0:
        return []
    path = _path(p, order)
    chunk = max(1, chunk_bytes // max(1, elem_size))
    sizes = np.array([[(b - a) * elem_size for _, a, b in _chunks(0, numel, chunk)]], dtype=np.int64)
    ids = np.arange(sizes.shape[1], dtype=np.int64)[None, :]

    def step(a: int, b: int, work: str, phase: int) -> Step:
        return Step(np.array([a], dtype=np.int64), np.full(sizes.shape, b, dtype=np.int64), sizes, ids, work=work,
                    one_link=True, phase=phase)

    return [step(path[i], path[i + 1], "reduce", 0) for i in range(p - 1)] + \
           [step(path[i], path[i - 1], "copy", 1) for i in range(p - 1, 0, -1)]


def _pipeline(s: Links, path: Sequence[int], k: int, c: float, o: float, work: float, cpu: list[float]) -> None:
    """Advances ``cpu`` (per-rank clocks) by ``k`` chunks of ``c`` bytes on the wire flowing down ``path``."""
    a, b = path[0], path[1]
    free, arrive = cpu[a], []
    for _ in range(k):
        free += c / s.beta[a][b]
        arrive.append(free + s.alpha[a][b])
    for i in range(1, len(path)):
        v = path[i]
        nxt = path[i + 1] if i + 1 < len(path) else None
        free, out = 0.0, []
        for t in arrive:
            cpu[v] = max(cpu[v], t) + o + work
            if nxt is not None:
                free = max(free, cpu[v]) + c / s.beta[v][nxt]
                out.append(free + s.alpha[v][nxt])
        arrive = out


def chain_allreduce_time(s: Links, nbytes: float, order: Sequence[int] | None, chunk_bytes: int, params: CostParams,
                         elem_scale: float = 1.0) -> float:
    """Seconds for :func:`chain_allreduce` of ``nbytes`` over the path ``order`` (identity if None)."""
    p = s.size
    if p <= 1 or nbytes <= 0:
        return 0.0
    path = _path(p, order)
    k, c, o = chunking(nbytes, chunk_bytes, params)
    w = c + framing(nbytes, chunk_bytes, params)  # bytes on the wire per simulated chunk
    cpu = [0.0] * p
    _pipeline(s, path, k, w, o, c * elem_scale / params.reduce_Bps, cpu)
    _pipeline(s, path[::-1], k, w, o, c / params.copy_Bps, cpu)
    return max(cpu)
