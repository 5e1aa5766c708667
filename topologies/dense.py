"""Exact all-reduce with the algorithm chosen by message size (or forced)."""

from __future__ import annotations

import os
from typing import Sequence

import torch

from commlayer.topologies.comm import OpComm
from commlayer.topologies.recursive_doubling import recursive_doubling_allreduce
from commlayer.topologies.reduce_ops import ReduceOp
from commlayer.topologies.ring import DEFAULT_CHUNK_BYTES, ring_allreduce

ALGORITHMS = ("auto", "ring", "tree", "ps")
# Below this many bytes the latency of 2(p-1) ring hops outweighs the ring's bandwidth advantage.
SMALL_BYTES = int(os.environ.get("COMMLAYER_SMALL_BYTES", 64 * 1024))


def choose_algorithm(nbytes: int, size: int) -> str:
    return "tree" if nbytes < SMALL_BYTES else "ring"


def allreduce(comm: OpComm, flat: torch.Tensor, op: ReduceOp, algo: str = "auto", order: Sequence[int] | None = None,
              chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> str:
    """All-reduces the 1-D contiguous ``flat`` in place; returns the algorithm used.

    Args:
        algo: "ring" (chunked pipelined ring), "tree" (recursive doubling), "ps" (co-located parameter
            servers, ``COMMLAYER_PS_SERVERS``) or "auto" (by size).
    """
    if algo not in ALGORITHMS:
        raise ValueError(f"Expected algo in {ALGORITHMS}, got {algo!r}")
    comm.declare(count=flat.numel(), dtype=flat.dtype, redop=op)
    if algo == "auto":
        algo = choose_algorithm(flat.numel() * flat.element_size(), comm.size)
    if algo == "ring":
        ring_allreduce(comm, flat, op, order=order, chunk_bytes=chunk_bytes)
    elif algo == "ps":
        from commlayer.topologies.ps import ps_allreduce

        ps_allreduce(comm, flat, op)
    else:
        recursive_doubling_allreduce(comm, flat, op)
    return algo
