"""Personalised exchanges: gather, scatter, all-to-all (direct, one message per pair)."""

from __future__ import annotations

from typing import Sequence

import torch

from commlayer.topologies.comm import OpComm
from commlayer.topologies.schedule import Step, single


def gather(comm: OpComm, src: torch.Tensor, outs: Sequence[torch.Tensor] | None, root: int) -> None:
    """``outs[r] = src of rank r`` on ``root`` (``outs`` is ignored elsewhere)."""
    comm.declare(root=root, count=src.numel(), dtype=src.dtype, confirm=True)
    if comm.rank == root:
        assert outs is not None
        for r in range(comm.size):
            if r == comm.rank:
                outs[r].copy_(src.view(outs[r].shape))
            else:
                outs[r].copy_(comm.recv_tensor(r, 0, outs[r].dtype, outs[r].numel()).view(outs[r].shape))
    else:
        comm.send_tensor(root, 0, src)
    comm.finish()


def scatter(comm: OpComm, ins: Sequence[torch.Tensor] | None, out: torch.Tensor, root: int) -> None:
    """``out = ins[rank]`` of ``root``."""
    comm.declare(root=root, count=out.numel(), dtype=out.dtype, confirm=True)
    if comm.rank == root:
        assert ins is not None
        for r in range(comm.size):
            if r != comm.rank:
                comm.send_tensor(r, 0, ins[r])
        out.copy_(ins[comm.rank].view(out.shape))
    else:
        out.copy_(comm.recv_tensor(root, 0, out.dtype, out.numel()).view(out.shape))
    comm.finish()


def alltoall(comm: OpComm, ins: Sequence[torch.Tensor], outs: Sequence[torch.Tensor]) -> None:
    """``outs[j]`` on rank i = ``ins[i]`` of rank j. Sends are issued first, so nothing waits in a cycle."""
    p, me = comm.size, comm.rank
    comm.declare(count=-1, dtype=outs[me].dtype)  # sizes may differ per rank (uneven splits)
    for k in range(1, p):
        dst = (me + k) % p
        comm.send_tensor(dst, 0, ins[dst])
    outs[me].copy_(ins[me].view(outs[me].shape))
    for k in range(1, p):
        src = (me - k) % p
        outs[src].copy_(comm.recv_tensor(src, 0, outs[src].dtype, outs[src].numel()).view(outs[src].shape))
    comm.finish()


def barrier(comm: OpComm) -> None:
    """Dissemination barrier (Hensgen et al. 1988): ceil(log2 p) rounds of empty messages."""
    p, me = comm.size, comm.rank
    dist, step = 1, 0
    while dist < p:
        comm.send((me + dist) % p, step, [])
        comm.recv((me - dist) % p, step)
        dist <<= 1
        step += 1


def barrier_schedule(size: int) -> list[Step]:
    """What :func:`barrier` sends: in round k every rank an empty message to ``rank + 2^k``."""
    steps, dist = [], 1
    while dist < size:
        steps.append(single(list(range(size)), [(r + dist) % size for r in range(size)], [0] * size, work="none"))
        dist <<= 1
    return steps
