"""Gathers of the zmq process group: all-gather in its four forms, ``gather``, ``scatter``.

Coalesced forms run as one operation (one Work, asynchronous like any other): the inputs are
packed as bytes into one buffer, gathered by one ring, and unpacked into the outputs on the
executor, never in the caller.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch._C._distributed_c10d import AllgatherOptions
import torch.distributed as dist

from commlayer.backend.runtime import GroupRuntime
from commlayer.backend.tensors import bounds_of, check_cpu, one
from commlayer.backend.work import ZmqWork
from commlayer.topologies import linear
from commlayer.topologies.comm import OpComm
from commlayer.topologies.ring import ring_allgather


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Gathers:
    """The gathering collectives of one group (composed into ``ProcessGroupZMQ``)."""

    def __init__(self, rt: GroupRuntime) -> None:
        self.rt = rt

    def _packed_allgather(self, name: str, per_rank: Sequence[Sequence[torch.Tensor]], inputs: Sequence[torch.Tensor],
                          opts: AllgatherOptions | None, outputs: list[torch.Tensor],
                          finalize: Callable[[], None] | None = None) -> ZmqWork:
        """Gathers ``inputs`` from every rank r into ``per_rank[r]`` (same shapes as r's inputs), as one ring of bytes."""
        rt = self.rt
        check_cpu([*inputs, *(o for outs in per_rank for o in outs)], name)
        if len(per_rank) != rt.size:
            raise ValueError(f"{name}: expected outputs for {rt.size} ranks, got {len(per_rank)}")
        for r, outs in enumerate(per_rank):
            if len(outs) != len(inputs):
                raise ValueError(f"{name}: expected {len(inputs)} output tensors for rank {r}, got {len(outs)}")
            for o, i in zip(outs, inputs):
                if o.dtype != i.dtype:
                    raise TypeError(f"{name}: expected output tensors of dtype {i.dtype} like the inputs, got {o.dtype}")
        for o, i in zip(per_rank[rt.rank], inputs):
            if o.numel() != i.numel():
                raise ValueError(f"{name}: expected the input to have {o.numel()} elements like this rank's output, got {i.numel()}")
        mine = [_as_bytes(i) for i in inputs]  # snapshot now: the caller may change its inputs after an async call

        def fn(comm: OpComm) -> None:
            bounds = bounds_of([sum(_nbytes(o) for o in outs) for outs in per_rank])
            flat = torch.empty(bounds[-1][1], dtype=torch.uint8)
            lo, _ = bounds[comm.rank]
            for b in mine:
                flat[lo:lo + b.numel()].copy_(b)
                lo += b.numel()
            ring_allgather(comm, flat, bounds, chunk_bytes=rt.options.chunk_bytes)
            for outs, (a, _) in zip(per_rank, bounds):
                for o in outs:
                    n = _nbytes(o)
                    if n:
                        _write(o, flat[a:a + n])
                    a += n

        return rt.run(name, outputs, fn, opts, finalize)

    def allgather(self, output_lists: list[list[torch.Tensor]], input_tensors: list[torch.Tensor],
                  opts: AllgatherOptions | None) -> ZmqWork:
        """``output_lists[0][r]`` receives rank r's input (shapes may differ per rank)."""
        one(input_tensors, "allgather")
        one(output_lists, "allgather", "output list")
        outs = output_lists[0]
        return self._packed_allgather("allgather", [[o] for o in outs], input_tensors, opts, list(outs))

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor, opts: AllgatherOptions | None,
                          name: str = "all_gather_into_tensor") -> ZmqWork:
        """``output`` (``size`` × input's elements) receives the inputs in rank order."""
        p = self.rt.size
        if output.numel() != input.numel() * p:
            raise ValueError(f"{name}: expected an output of {input.numel() * p} elements, got {output.numel()}")
        dense = output if output.is_contiguous() else torch.empty(output.shape, dtype=output.dtype)
        parts = _split_view(dense, p)

        def back() -> None:
            if dense is not output:
                output.copy_(dense)

        return self._packed_allgather(name, [[part] for part in parts], [input], opts, [output], back if dense is not output else None)

    def allgather_coalesced(self, output_lists: list[list[torch.Tensor]], input_list: list[torch.Tensor],
                            opts: AllgatherOptions | None) -> ZmqWork:
        """``output_lists[r][i]`` receives rank r's ``input_list[i]``."""
        return self._packed_allgather("allgather_coalesced", output_lists, input_list, opts,
                                      [t for outs in output_lists for t in outs])

    def all_gather_single_coalesced(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor],
                                    opts: AllgatherOptions | None) -> ZmqWork:
        """``all_gather_single`` of every (output, input) pair as one operation."""
        p = self.rt.size
        if len(outputs) != len(inputs):
            raise ValueError(f"all_gather_into_tensor_coalesced: expected as many outputs as inputs, got {len(outputs)} and {len(inputs)}")
        for o, i in zip(outputs, inputs):
            if o.numel() != i.numel() * p:
                raise ValueError(f"all_gather_into_tensor_coalesced: expected an output of {i.numel() * p} elements, got {o.numel()}")
        dense = [o if o.is_contiguous() else torch.empty(o.shape, dtype=o.dtype) for o in outputs]
        per_tensor = [_split_view(d, p) for d in dense]
        per_rank = [[parts[r] for parts in per_tensor] for r in range(p)]

        def back() -> None:
            for o, d in zip(outputs, dense):
                if d is not o:
                    o.copy_(d)

        return self._packed_allgather("all_gather_into_tensor_coalesced", per_rank, inputs, opts, list(outputs), back)

    def gather(self, output_lists: list[list[torch.Tensor]], input_tensors: list[torch.Tensor], opts: dist.GatherOptions) -> ZmqWork:
        """The root's ``output_lists[0][r]`` receives rank r's input."""
        rt = self.rt
        one(input_tensors, "gather")
        root = rt.check_root(opts.rootRank, "gather")
        inp = input_tensors[0].contiguous()
        outs = output_lists[0] if rt.rank == root else None
        check_cpu([inp, *(outs or [])], "gather")
        if outs is not None and len(outs) != rt.size:
            raise ValueError(f"gather: expected {rt.size} output tensors on the root, got {len(outs)}")
        return rt.run("gather", list(outs or []), lambda comm: linear.gather(comm, inp, outs, root), opts)

    def scatter(self, output_tensors: list[torch.Tensor], input_lists: list[list[torch.Tensor]], opts: dist.ScatterOptions) -> ZmqWork:
        """Rank r's output receives the root's ``input_lists[0][r]``."""
        rt = self.rt
        one(output_tensors, "scatter")
        root = rt.check_root(opts.rootRank, "scatter")
        ins = [t.contiguous() for t in input_lists[0]] if rt.rank == root else None
        out = output_tensors[0]
        check_cpu([out, *(ins or [])], "scatter")
        if ins is not None and len(ins) != rt.size:
            raise ValueError(f"scatter: expected {rt.size} input tensors on the root, got {len(ins)}")
        return rt.run("scatter", [out], lambda comm: linear.scatter(comm, ins, out, root), opts)


def _split_view(t: torch.Tensor, p: int) -> list[torch.Tensor]:
    """``p`` equal parts of the contiguous ``t`` in memory order (views)."""
    flat = t.view(-1)
    return list(flat.chunk(p)) if flat.numel() else [flat[:0]] * p


def _write(dst: torch.Tensor, src_bytes: torch.Tensor) -> None:
    if dst.is_contiguous():
        dst.view(-1).view(torch.uint8).copy_(src_bytes)
    else:
        dst.copy_(src_bytes.view(dst.dtype).view(dst.shape))
