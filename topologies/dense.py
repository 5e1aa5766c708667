"""Exact all-reduce with the algorithm chosen by message size (or forced), from the registry."""

from __future__ import annotations

from typing import Sequence

import torch

from commlayer.topologies import registry
from commlayer.topologies.comm import OpComm
from commlayer.topologies.reduce_ops import ReduceOp
from commlayer.topologies.ring import DEFAULT_CHUNK_BYTES

#: "auto" and every registered algorithm (a snapshot taken at import; :func:`registry.names` is live).
ALGORITHMS = registry.names(auto=True)


def choose_algorithm(nbytes: int, size: int) -> str:
    return registry.choose(nbytes, size)


def allreduce(comm: OpComm, flat: torch.Tensor, op: ReduceOp, algo: str = "auto", order: Sequence[int] | None = None,
              chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> str:
    """All-reduces the 1-D contiguous ``flat`` in place; returns the algorithm used.

    Args:
        algo: a name of :mod:`commlayer.topologies.registry` ("ring", "tree", "chain", "ps"...) or
            "auto" (by size).
    """
    a = registry.resolve(algo, flat.numel() * flat.element_size(), comm.size)
    a.check(comm.size, flat.dtype, op)
    comm.declare(count=flat.numel(), dtype=flat.dtype, redop=op)
    a.run(comm, flat, op, order, chunk_bytes)
    return a.name
