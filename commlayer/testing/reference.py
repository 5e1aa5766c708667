"""Reference reductions that distributed results are compared against (plain numpy / torch, one process).

Tests and the reliability soak compute what a collective must return from every rank's input
with these, never with the code under test.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

_RED = dist.ReduceOp


def reduce_tensors(xs: Sequence[torch.Tensor], op: Any, world: int) -> torch.Tensor:
    """What ``all_reduce(op)`` over ``world`` ranks holding ``xs`` must give, in rank order.

    AVG divides floats (complex: each real part) by ``world`` and truncates integers, like the
    zmq backend. Inputs are small integers in the reliability runs, so every order gives the same bits.
    """
    out = xs[0].clone()
    for x in xs[1:]:
        if op in (_RED.SUM, _RED.AVG):
            out.add_(x)
        elif op == _RED.PRODUCT:
            out.mul_(x)
        elif op == _RED.MIN:
            out = torch.minimum(out, x)
        elif op == _RED.MAX:
            out = torch.maximum(out, x)
        elif op == _RED.BAND:
            out.bitwise_and_(x)
        elif op == _RED.BOR:
            out.bitwise_or_(x)
        elif op == _RED.BXOR:
            out.bitwise_xor_(x)
        else:
            raise ValueError(f"reduce_tensors: expected SUM, AVG, PRODUCT, MIN, MAX, BAND, BOR or BXOR, got {op!r}")
    if op == _RED.AVG and world > 1:
        if out.dtype.is_complex:  # each part divided as a real number (complex division rounds differently)
            torch.view_as_real(out).div_(world)
        elif out.dtype.is_floating_point:
            out.div_(world)
        else:
            out = torch.div(out, world, rounding_mode="trunc").to(xs[0].dtype)
    return out


def reduce_arrays(xs: Sequence[np.ndarray], op: str) -> np.ndarray:
    """``op`` ("sum", "avg", "max", "min", "prod") over the ranks' arrays, in float64."""
    stack = np.stack([np.asarray(x, dtype=np.float64) for x in xs])
    fns: dict[str, Callable[..., Any]] = {"sum": stack.sum, "avg": stack.mean, "max": stack.max, "min": stack.min, "prod": stack.prod}
    if op not in fns:
        raise ValueError(f"reduce_arrays: expected one of {sorted(fns)}, got {op!r}")
    return np.asarray(fns[op](0))


def majority_sign(xs: Sequence[np.ndarray]) -> np.ndarray:
    """Element-wise majority vote of the ranks' signs (signSGD with majority vote; ties give 0)."""
    return np.sign(np.sum([np.where(np.signbit(x), -1, 1) for x in xs], axis=0))
