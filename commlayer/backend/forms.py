"""The call forms gloo's ``ProcessGroup`` methods accept, normalised to one (tensors, typed options) form.

torch's Python API always calls the first pybind overload (lists of tensors and a c10d options
object). Wrappers such as torchft, and users holding the group object, also call the short forms
gloo accepts, e.g. ``pg.allreduce(t)``, ``pg.allreduce([t], ReduceOp.SUM)``, ``pg.broadcast(t, 0)``,
``pg.allgather(outs, t)``, ``pg.reduce(t, 0, op)`` (``help(dist.ProcessGroup.allreduce)``).
Every function here accepts both and returns the long form; bad input raises a ``TypeError``
naming the method and what it expected.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Sequence, TypeVar, Union

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import AllgatherOptions

AllreduceOptions = dist.AllreduceOptions
AllreduceCoalescedOptions = dist.AllreduceCoalescedOptions
AllToAllOptions = dist.AllToAllOptions
BarrierOptions = dist.BarrierOptions
BroadcastOptions = dist.BroadcastOptions
GatherOptions = dist.GatherOptions
ReduceOptions = dist.ReduceOptions
ReduceScatterOptions = dist.ReduceScatterOptions
ScatterOptions = dist.ScatterOptions

Op = Union[dist.ReduceOp, "dist.ReduceOp.RedOpType"]
Tensors = Union[torch.Tensor, Sequence[torch.Tensor]]
OptT = TypeVar("OptT")


def tensor_list(x: Tensors, method: str, what: str = "tensors") -> list[torch.Tensor]:
    """``[t]`` for a tensor, the list itself for a sequence of tensors."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in x):
        return list(x)
    raise TypeError(f"ProcessGroup.{method}: expected a tensor or a list of tensors as {what}, got {type(x).__name__}")


def _is_nested(x: object) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(e, (list, tuple)) for e in x)


def _timed(opts: OptT, timeout: timedelta | None) -> OptT:
    if timeout is not None:
        if not isinstance(timeout, timedelta):
            raise TypeError(f"expected the timeout as a datetime.timedelta, got {type(timeout).__name__}")
        opts.timeout = timeout  # type: ignore[attr-defined]
    return opts


def _op_options(cls: type[OptT], method: str, op: object, timeout: timedelta | None) -> OptT:
    o = cls()
    if op is not None:
        if not isinstance(op, (dist.ReduceOp, dist.ReduceOp.RedOpType)):
            raise TypeError(f"ProcessGroup.{method}: expected {cls.__name__} or a ReduceOp, got {type(op).__name__}")
        o.reduceOp = op  # type: ignore[attr-defined]
    return _timed(o, timeout)


def _root_options(cls: type[OptT], method: str, root: object, timeout: timedelta | None) -> OptT:
    if isinstance(root, bool) or not isinstance(root, int):
        raise TypeError(f"ProcessGroup.{method}: expected {cls.__name__} or an int root rank, got {type(root).__name__}")
    o = cls()
    o.rootRank = int(root)  # type: ignore[attr-defined]
    return _timed(o, timeout)


def allreduce(tensors: Tensors, opts: AllreduceOptions | Op | None, timeout: timedelta | None,
              cls: type = AllreduceOptions, method: str = "allreduce") -> tuple[list[torch.Tensor], "AllreduceOptions"]:
    """``(tensors, opts)`` / ``(tensors | tensor, op=SUM, timeout=None)``."""
    ts = tensor_list(tensors, method)
    if isinstance(opts, cls):
        return ts, _timed(opts, timeout)
    return ts, _op_options(cls, method, opts, timeout)


def broadcast(tensors: Tensors, opts: BroadcastOptions | int | None, timeout: timedelta | None) -> tuple[list[torch.Tensor], BroadcastOptions]:
    """``(tensors, opts)`` / ``(tensor, root, timeout=None)``."""
    ts = tensor_list(tensors, "broadcast")
    if opts is None or isinstance(opts, BroadcastOptions):
        return ts, _timed(opts or BroadcastOptions(), timeout)
    return ts, _root_options(BroadcastOptions, "broadcast", opts, timeout)


def reduce(tensors: Tensors, opts: ReduceOptions | int | None, op: Op | None,
           timeout: timedelta | None) -> tuple[list[torch.Tensor], ReduceOptions]:
    """``(tensors, opts)`` / ``(tensor, root, op=SUM, timeout=None)``."""
    ts = tensor_list(tensors, "reduce")
    if opts is None or isinstance(opts, ReduceOptions):
        return ts, _timed(opts or ReduceOptions(), timeout)
    o = _root_options(ReduceOptions, "reduce", opts, timeout)
    if op is not None:
        o.reduceOp = _op_options(ReduceOptions, "reduce", op, None).reduceOp
    return ts, o


def gather_lists(outputs: Sequence[object], inputs: Tensors, method: str) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """``([[o0..oN-1]], [t])`` / ``([o0..oN-1], t)`` (``outputs`` may be ``[]`` off the root of a gather)."""
    ins = tensor_list(inputs, method, "input")
    if _is_nested(outputs):
        return [tensor_list(list(o), method, "outputs") for o in outputs], ins  # type: ignore[arg-type]
    outs = tensor_list(list(outputs), method, "outputs")  # type: ignore[arg-type]
    return ([outs] if outs or isinstance(inputs, torch.Tensor) else []), ins


def scatter_lists(outputs: Tensors, inputs: Sequence[object], method: str) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """``([t], [[i0..iN-1]])`` / ``(t, [i0..iN-1])``."""
    outs = tensor_list(outputs, method, "output")
    if _is_nested(inputs):
        return outs, [tensor_list(list(i), method, "inputs") for i in inputs]  # type: ignore[arg-type]
    ins = tensor_list(list(inputs), method, "inputs")  # type: ignore[arg-type]
    return outs, ([ins] if ins or isinstance(outputs, torch.Tensor) else [])


def plain(cls: type[OptT], opts: OptT | None, timeout: timedelta | None, method: str) -> OptT:
    """Options without an op or root: ``opts`` / ``timeout`` in its place / nothing."""
    if isinstance(opts, timedelta):
        opts, timeout = None, opts
    if opts is not None and not isinstance(opts, cls):
        raise TypeError(f"ProcessGroup.{method}: expected {cls.__name__} or a timedelta, got {type(opts).__name__}")
    return _timed(opts if opts is not None else cls(), timeout)


def rooted(cls: type[OptT], opts: OptT | int | None, timeout: timedelta | None, method: str) -> OptT:
    """``opts`` / an int root (the short forms of gather and scatter)."""
    if opts is None or isinstance(opts, cls):
        return _timed(opts if opts is not None else cls(), timeout)
    return _root_options(cls, method, opts, timeout)


def reduce_op_or(cls: type[OptT], opts: OptT | Op | None, timeout: timedelta | None, method: str) -> OptT:
    """``opts`` / a ReduceOp (the short form of reduce_scatter)."""
    if isinstance(opts, cls):
        return _timed(opts, timeout)
    return _op_options(cls, method, opts, timeout)


__all__ = ["AllgatherOptions", "AllreduceOptions", "AllreduceCoalescedOptions", "AllToAllOptions", "BarrierOptions",
           "BroadcastOptions", "GatherOptions", "ReduceOptions", "ReduceScatterOptions", "ScatterOptions"]
