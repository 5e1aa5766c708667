"""Tensor plumbing for the process group: flattening, write-back, reduce-op translation."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from commlayer.topologies.reduce_ops import ReduceOp

_OPS = {
    dist.ReduceOp.RedOpType.SUM: ReduceOp.SUM,
    dist.ReduceOp.RedOpType.AVG: ReduceOp.AVG,
    dist.ReduceOp.RedOpType.PRODUCT: ReduceOp.PRODUCT,
    dist.ReduceOp.RedOpType.MIN: ReduceOp.MIN,
    dist.ReduceOp.RedOpType.MAX: ReduceOp.MAX,
    dist.ReduceOp.RedOpType.BAND: ReduceOp.BAND,
    dist.ReduceOp.RedOpType.BOR: ReduceOp.BOR,
    dist.ReduceOp.RedOpType.BXOR: ReduceOp.BXOR,
}


def translate_op(op: dist.ReduceOp) -> tuple[ReduceOp, float | torch.Tensor | None]:
    """Maps a torch ReduceOp to ours; PREMUL_SUM becomes (SUM, factor)."""
    kind = op.op if hasattr(op, "op") else op
    if kind == dist.ReduceOp.RedOpType.PREMUL_SUM:
        return ReduceOp.SUM, op.factor
    try:
        return _OPS[kind], None
    except KeyError:
        raise ValueError(f"Expected a ReduceOp in {[k.name for k in _OPS] + ['PREMUL_SUM']}, got {kind}") from None


def check_cpu(tensors: Sequence[torch.Tensor], what: str) -> None:
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"{what}: expected a CPU tensor, got one on {t.device} (the zmq process group stages "
                             "device tensors through host memory itself; this path was given one directly)")
        if t.is_sparse:
            raise ValueError(f"{what}: sparse tensors are not supported by the zmq backend, got layout {t.layout}")


class Flat:
    """A 1-D contiguous working buffer over one or more tensors, written back on :meth:`commit`.

    A single contiguous tensor is used in place (no copy).
    """

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.tensors = list(tensors)
        dtypes = {t.dtype for t in self.tensors}
        if len(dtypes) > 1:
            raise TypeError(f"Expected tensors of one dtype, got {sorted(str(d) for d in dtypes)}")
        if len(self.tensors) == 1 and self.tensors[0].is_contiguous():
            self.buf = self.tensors[0].view(-1)
            self.inplace = True
        else:
            self.buf = torch.cat([t.reshape(-1) for t in self.tensors]) if self.tensors else torch.empty(0)
            self.inplace = False

    def commit(self) -> None:
        if self.inplace:
            return
        off = 0
        for t in self.tensors:
            n = t.numel()
            t.copy_(self.buf[off:off + n].view_as(t))
            off += n


def as_flat_real(t: torch.Tensor) -> torch.Tensor:
    """A real-valued view for complex tensors (sums work element-wise on real and imaginary parts)."""
    return torch.view_as_real(t) if t.is_complex() else t


def bounds_of(sizes: Sequence[int]) -> list[tuple[int, int]]:
    out, lo = [], 0
    for n in sizes:
        out.append((lo, lo + n))
        lo += n
    return out


def one(items: Sequence[object], what: str, kind: str = "tensor") -> None:
    """Raises unless ``items`` holds exactly one element (one tensor per process on CPU)."""
    if len(items) != 1:
        raise ValueError(f"{what}: expected exactly one {kind} per process on CPU, got {len(items)}")
