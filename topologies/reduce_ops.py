"""Element-wise reductions used by every reducing collective."""

from __future__ import annotations

from enum import Enum

import torch


class ReduceOp(Enum):
    SUM = "sum"
    AVG = "avg"
    PRODUCT = "product"
    MIN = "min"
    MAX = "max"
    BAND = "band"
    BOR = "bor"
    BXOR = "bxor"


_BITWISE = (ReduceOp.BAND, ReduceOp.BOR, ReduceOp.BXOR)


def check_op(op: ReduceOp, dtype: torch.dtype) -> None:
    """Raises a clear error for a reduction that makes no sense on ``dtype``."""
    if op in _BITWISE and (dtype.is_floating_point or dtype.is_complex):
        raise TypeError(f"Expected an integer or bool tensor for {op.name}, got {dtype}")
    if op in (ReduceOp.MIN, ReduceOp.MAX) and dtype.is_complex:
        raise TypeError(f"Expected a real tensor for {op.name}, got {dtype}")
    if op == ReduceOp.AVG and dtype == torch.bool:
        raise TypeError("Expected a numeric tensor for AVG, got torch.bool")


def combine_(dst: torch.Tensor, src: torch.Tensor, op: ReduceOp) -> None:
    """``dst = dst (op) src`` in place (AVG combines like SUM; see :func:`finalize_`)."""
    if op in (ReduceOp.SUM, ReduceOp.AVG):
        if dst.dtype == torch.bool:
            dst.logical_or_(src)
        else:
            dst.add_(src)
    elif op == ReduceOp.PRODUCT:
        if dst.dtype == torch.bool:
            dst.logical_and_(src)
        else:
            dst.mul_(src)
    elif op == ReduceOp.MIN:
        torch.minimum(dst, src, out=dst)
    elif op == ReduceOp.MAX:
        torch.maximum(dst, src, out=dst)
    elif op == ReduceOp.BAND:
        dst.bitwise_and_(src)
    elif op == ReduceOp.BOR:
        dst.bitwise_or_(src)
    elif op == ReduceOp.BXOR:
        dst.bitwise_xor_(src)
    else:  # pragma: no cover - enum is closed
        raise ValueError(f"unknown reduce op {op}")


def finalize_(t: torch.Tensor, op: ReduceOp, size: int) -> None:
    """Applies the post-processing of ``op`` (the division of AVG)."""
    if op == ReduceOp.AVG and size > 1:
        if t.dtype.is_floating_point or t.dtype.is_complex:
            t.div_(size)
        else:
            t.copy_(torch.div(t, size, rounding_mode="trunc"))
