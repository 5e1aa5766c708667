"""Reduce-scatters and all-to-alls of the zmq process group.

Every reduce-scatter form (list, single tensor, coalesced) packs its inputs into one buffer per
dtype, in which rank r's block holds every piece destined to r, and runs one ring per dtype
inside one operation: one Work, asynchronous like any other.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from commlayer.backend.runtime import GroupRuntime
from commlayer.backend.tensors import bounds_of, check_cpu, one, translate_op
from commlayer.backend.work import ZmqWork
from commlayer.topologies import linear
from commlayer.topologies.comm import OpComm
from commlayer.topologies.reduce_ops import check_op, finalize_
from commlayer.topologies.ring import ring_reduce_scatter

PHASE = 1 << 16  # step offset between the per-dtype rings of one coalesced operation


class Scatters:
    """The scattering collectives of one group (composed into ``ProcessGroupZMQ``)."""

    def __init__(self, rt: GroupRuntime) -> None:
        self.rt = rt

    def _packed_reduce_scatter(self, name: str, outs: Sequence[torch.Tensor], pieces: Sequence[Sequence[torch.Tensor]],
                               opts: dist.ReduceScatterOptions) -> ZmqWork:
        """``outs[i]`` = reduction over ranks of their ``pieces[i][this rank]``."""
        rt = self.rt
        p = rt.size
        check_cpu([*outs, *(t for ps in pieces for t in ps)], name)
        op, factor = translate_op(opts.reduceOp)
        for o, ps in zip(outs, pieces):
            if len(ps) != p:
                raise ValueError(f"{name}: expected {p} input tensors, got {len(ps)}")
            for r, t in enumerate(ps):
                if t.dtype != o.dtype:
                    raise TypeError(f"{name}: expected inputs of dtype {o.dtype} like the output, got {t.dtype}")
                if r == rt.rank and t.numel() != o.numel():
                    raise ValueError(f"{name}: expected this rank's input to have {o.numel()} elements like the output, got {t.numel()}")
            check_op(op, o.dtype)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, o in enumerate(outs):
            by_dtype.setdefault(o.dtype, []).append(i)
        # Packed now, in the caller: the inputs may be reused as soon as the call returns.
        packs = []
        for dtype, idx in by_dtype.items():
            bounds = bounds_of([sum(pieces[i][r].numel() for i in idx) for r in range(p)])
            parts = [pieces[i][r].reshape(-1) for r in range(p) for i in idx]
            packs.append((idx, bounds, torch.cat(parts) if parts else torch.empty(0, dtype=dtype)))  # cat copies

        def fn(comm: OpComm) -> None:
            for g, (idx, bounds, flat) in enumerate(packs):
                if factor is not None:
                    flat.mul_(factor)
                ring_reduce_scatter(comm.shifted(g * PHASE), flat, op, bounds, chunk_bytes=rt.options.chunk_bytes)
                a, b = bounds[comm.rank]
                mine = flat[a:b]
                finalize_(mine, op, comm.size)
                for i in idx:
                    n = outs[i].numel()
                    outs[i].copy_(mine[:n].view_as(outs[i]))
                    mine = mine[n:]

        return rt.run(name, list(outs), fn, opts)

    def reduce_scatter(self, output_tensors: list[torch.Tensor], input_lists: list[list[torch.Tensor]],
                       opts: dist.ReduceScatterOptions) -> ZmqWork:
        """Rank r's output = reduction of every rank's ``input_lists[0][r]``."""
        one(output_tensors, "reduce_scatter")
        one(input_lists, "reduce_scatter", "input list")
        return self._packed_reduce_scatter("reduce_scatter", output_tensors, input_lists, opts)

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor, opts: dist.ReduceScatterOptions) -> ZmqWork:
        """``reduce_scatter_tensor``: rank r's output = reduction of block r of every rank's input."""
        return self._packed_reduce_scatter("reduce_scatter_tensor", [output], [self._blocks(output, input, "reduce_scatter_tensor")], opts)

    def reduce_scatter_single_coalesced(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor],
                                        opts: dist.ReduceScatterOptions) -> ZmqWork:
        """``reduce_scatter_single`` of every (output, input) pair as one operation."""
        name = "reduce_scatter_tensor_coalesced"
        if len(outputs) != len(inputs):
            raise ValueError(f"{name}: expected as many outputs as inputs, got {len(outputs)} and {len(inputs)}")
        return self._packed_reduce_scatter(name, outputs, [self._blocks(o, i, name) for o, i in zip(outputs, inputs)], opts)

    def _blocks(self, output: torch.Tensor, input: torch.Tensor, name: str) -> list[torch.Tensor]:
        p = self.rt.size
        if input.numel() != output.numel() * p:
            raise ValueError(f"{name}: expected an input of {output.numel() * p} elements, got {input.numel()}")
        return list(input.reshape(-1).chunk(p)) if input.numel() else [input.reshape(-1)] * p

    def alltoall(self, output_tensors: list[torch.Tensor], input_tensors: list[torch.Tensor], opts: dist.AllToAllOptions) -> ZmqWork:
        """Rank r's ``output_tensors[s]`` receives rank s's ``input_tensors[r]``."""
        rt = self.rt
        check_cpu([*output_tensors, *input_tensors], "all_to_all")
        p = rt.size
        if len(output_tensors) != p or len(input_tensors) != p:
            raise ValueError(f"all_to_all: expected {p} input and {p} output tensors, got {len(input_tensors)} and {len(output_tensors)}")
        ins = [t.contiguous() for t in input_tensors]
        return rt.run("all_to_all", list(output_tensors), lambda comm: linear.alltoall(comm, ins, output_tensors), opts)

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor, output_split_sizes: Sequence[int],
                          input_split_sizes: Sequence[int], opts: dist.AllToAllOptions) -> ZmqWork:
        """Splits along dim 0 (``[]`` = equal splits) and exchanges block r with rank r."""
        rt = self.rt
        check_cpu([output, input], "all_to_all_single")
        p = rt.size
        osplit = list(output_split_sizes) or _even_split(output, p, "output")
        isplit = list(input_split_sizes) or _even_split(input, p, "input")
        n_out = output.shape[0] if output.dim() else 0
        n_in = input.shape[0] if input.dim() else 0
        if len(osplit) != p or len(isplit) != p or sum(osplit) != n_out or sum(isplit) != n_in:
            raise ValueError(f"all_to_all_single: expected {p} split sizes summing to dim 0 (input {tuple(input.shape)}, output "
                             f"{tuple(output.shape)}), got input splits {isplit}, output splits {osplit}")
        ins = [t.contiguous() for t in input.split(isplit)]
        outs = list(output.split(osplit))
        return rt.run("all_to_all_single", [output], lambda comm: linear.alltoall(comm, ins, outs), opts)


def _even_split(t: torch.Tensor, p: int, what: str) -> list[int]:
    n = t.shape[0] if t.dim() else 0
    if n % p:
        raise ValueError(f"all_to_all_single: expected the {what}'s dim 0 ({n}) divisible by the group size {p} when no split sizes are given")
    return [n // p] * p
