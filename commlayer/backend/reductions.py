"""Reductions of the zmq process group: ``allreduce``, ``allreduce_coalesced``, ``reduce``.

Argument lists are the long forms torch 2.13 passes (docs/torch-backend.md §5); the short forms
are normalised by :mod:`commlayer.backend.forms` before they get here.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.distributed as dist

from commlayer.backend.collectives import codec_algorithm, exact_allreduce
from commlayer.backend.runtime import GroupRuntime
from commlayer.backend.tensors import Flat, check_cpu, translate_op
from commlayer.backend.work import ZmqWork
from commlayer.topologies import tree
from commlayer.topologies.codec_allreduce import codec_allreduce
from commlayer.topologies.comm import OpComm
from commlayer.topologies.reduce_ops import ReduceOp, check_op, finalize_

AnyAllreduceOptions = Union[dist.AllreduceOptions, dist.AllreduceCoalescedOptions]


class Reductions:
    """The reduction collectives of one group (composed into ``ProcessGroupZMQ``)."""

    def __init__(self, rt: GroupRuntime) -> None:
        self.rt = rt

    def allreduce(self, tensors: Sequence[torch.Tensor], opts: AnyAllreduceOptions, name: str = "allreduce") -> ZmqWork:
        """All-reduces ``tensors`` in place (several tensors are reduced as one flat buffer)."""
        rt = self.rt
        check_cpu(tensors, name)
        op, factor = translate_op(opts.reduceOp)
        flat = Flat(tensors)
        check_op(op, flat.buf.dtype)
        auto = rt.autocodec
        if auto is not None and auto.applies(op, flat.buf, factor):
            ticket = auto.issue(flat.buf)  # numbered and timed now, in issue order

            def chosen(comm: OpComm) -> None:
                auto.run(comm, flat.buf, op, ticket)
                flat.commit()

            return rt.run(name, list(tensors), chosen, opts)
        comp = rt.compression
        if comp is not None and comp.applies(op, flat.buf, factor):
            ctx = comp.context(flat.buf)  # numbered now, in issue order

            def lossy(comm: OpComm) -> None:
                codec_allreduce(comm, flat.buf, comp.codec, ctx, algo=codec_algorithm(rt), average=op == ReduceOp.AVG,
                                order=rt.options.ring_order, chunk_bytes=rt.options.chunk_bytes)
                flat.commit()

            return rt.run(name, list(tensors), lossy, opts)

        def exact(comm: OpComm) -> None:
            if factor is not None:
                flat.buf.mul_(factor)
            exact_allreduce(rt, comm, flat.buf, op)
            finalize_(flat.buf, op, comm.size)
            flat.commit()

        return rt.run(name, list(tensors), exact, opts)

    def allreduce_coalesced(self, tensors: Sequence[torch.Tensor], opts: dist.AllreduceCoalescedOptions) -> ZmqWork:
        """One asynchronous all-reduce of the tensors' concatenation (one Work for all)."""
        return self.allreduce(tensors, opts, "allreduce_coalesced")

    def reduce(self, tensors: Sequence[torch.Tensor], opts: dist.ReduceOptions) -> ZmqWork:
        """Reduces onto ``opts.rootRank`` (other ranks' tensors are left unchanged)."""
        rt = self.rt
        check_cpu(tensors, "reduce")
        root = rt.check_root(opts.rootRank, "reduce")
        op, factor = translate_op(opts.reduceOp)
        flat = Flat(tensors)
        check_op(op, flat.buf.dtype)

        def fn(comm: OpComm) -> None:
            mine = comm.rank == root
            buf = flat.buf if mine else flat.buf.clone()
            if factor is not None:
                buf.mul_(factor)
            tree.binomial_reduce(comm, buf, op, root)
            if mine:
                finalize_(buf, op, comm.size)
                flat.commit()

        return rt.run("reduce", list(tensors), fn, opts)

    def broadcast(self, tensors: Sequence[torch.Tensor], opts: dist.BroadcastOptions) -> ZmqWork:
        """Broadcasts the root's tensors (as one flat buffer) to every rank."""
        rt = self.rt
        check_cpu(tensors, "broadcast")
        root = rt.check_root(opts.rootRank, "broadcast")
        flat = Flat(tensors)

        def fn(comm: OpComm) -> None:
            tree.broadcast(comm, flat.buf, root)
            if comm.rank != root:
                flat.commit()

        return rt.run("broadcast", list(tensors), fn, opts)
