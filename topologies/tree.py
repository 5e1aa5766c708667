"""Rooted collectives: binomial-tree broadcast and reduce, and a pipelined chain broadcast.

Binomial trees take ceil(log2 p) rounds (latency-optimal for small messages). For large
messages the chain broadcast cuts the data into chunks that flow down a path, so each link
carries the message once and all links work at the same time.
"""

from __future__ import annotations

import torch

from commlayer.topologies.comm import OpComm
from commlayer.topologies.reduce_ops import ReduceOp, combine_
from commlayer.topologies.ring import _chunks

CHAIN_THRESHOLD_BYTES = 256 * 1024


def binomial_broadcast(comm: OpComm, flat: torch.Tensor, root: int) -> None:
    p = comm.size
    v = (comm.rank - root) % p
    mask = 1
    while mask < p:
        if v & mask:
            flat.copy_(comm.recv_tensor((v - mask + root) % p, 0, flat.dtype, flat.numel()))
            break
        mask <<= 1
    mask >>= 1
    while mask > 0:
        if v + mask < p:
            comm.send_tensor((v + mask + root) % p, 0, flat)
        mask >>= 1
    comm.finish()


def chain_broadcast(comm: OpComm, flat: torch.Tensor, root: int, chunk_bytes: int = 1 << 20) -> None:
    p = comm.size
    v = (comm.rank - root) % p
    chunk = max(1, chunk_bytes // flat.element_size())
    nxt = (comm.rank + 1) % p if v < p - 1 else None
    prv = (comm.rank - 1) % p
    for j, a, b in _chunks(0, flat.numel(), chunk):
        if v > 0:
            flat[a:b].copy_(comm.recv_tensor(prv, 0, flat.dtype, b - a, chunk=j))
        if nxt is not None:
            comm.send_tensor(nxt, 0, flat[a:b], chunk=j)
    comm.finish()


def broadcast(comm: OpComm, flat: torch.Tensor, root: int) -> None:
    """Copies ``flat`` from group rank ``root`` to every rank, in place."""
    comm.declare(root=root, count=flat.numel(), dtype=flat.dtype, confirm=True)
    if comm.size == 1 or flat.numel() == 0:
        comm.finish()
        return
    if flat.numel() * flat.element_size() >= CHAIN_THRESHOLD_BYTES and comm.size > 2:
        chain_broadcast(comm, flat, root)
    else:
        binomial_broadcast(comm, flat, root)


def binomial_reduce(comm: OpComm, flat: torch.Tensor, op: ReduceOp, root: int) -> None:
    """Reduces ``flat`` of every rank into ``flat`` on ``root``; other ranks' tensors are left unchanged."""
    p = comm.size
    comm.declare(root=root, count=flat.numel(), dtype=flat.dtype, redop=op, confirm=True)
    if p == 1:
        return
    v = (comm.rank - root) % p
    acc = flat if v == 0 else None
    mask = 1
    while mask < p:
        if v & mask:
            comm.send_tensor((v - mask + root) % p, 0, flat if acc is None else acc)
            break
        if v + mask < p:
            other = comm.recv_tensor((v + mask + root) % p, 0, flat.dtype, flat.numel())
            if acc is None:
                acc = flat.clone()
            combine_(acc, other, op)
        mask <<= 1
    comm.finish()
