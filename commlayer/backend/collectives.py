"""Which algorithm an all-reduce of the zmq process group runs (the ``COMMLAYER_ALGO`` dispatch).

Kept in one small module, apart from the collective families that call it
(:mod:`commlayer.backend.reductions`), so the algorithm registry can replace it in one place.
"""

from __future__ import annotations

import torch

from commlayer.backend.runtime import GroupRuntime
from commlayer.topologies.comm import OpComm
from commlayer.topologies.dense import allreduce as dense_allreduce
from commlayer.topologies.reduce_ops import ReduceOp
from commlayer.topologies.shm_allreduce import SETUP_STEPS, shm_allreduce


def exact_allreduce(rt: GroupRuntime, comm: OpComm, buf: torch.Tensor, op: ReduceOp) -> None:
    """Runs the exact all-reduce the group's options (or its link-aware controller) choose."""
    if rt.adaptive is not None:
        rt.adaptive.run(comm, buf, op)
        return
    if rt.options.algo == "auto" and shm_allreduce(comm, buf, op):  # every rank co-located: shared memory
        return
    dense_allreduce(comm.shifted(SETUP_STEPS), buf, op, rt.options.algo, rt.options.ring_order, rt.options.chunk_bytes)


def codec_algorithm(rt: GroupRuntime) -> str:
    """The schedule of the compressed all-reduce: any registered algorithm (COMMLAYER_ALGO=ps too)."""
    return rt.options.algo
