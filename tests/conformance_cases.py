"""Collective cases run on the zmq group and on a gloo group over the same ranks, same inputs.

Each case returns (zmq_outputs, reference_outputs, exact). The reference is gloo's result, or a
numpy/torch computation where gloo rejects the case (AVG, PREMUL_SUM, some dtypes).
"""

from __future__ import annotations

import zlib
from typing import Any, Callable

import torch
import torch.distributed as dist

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
INTS = [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64]
SIZES = [0, 1, 7, 1000, 40_000]  # the last one takes the ring path in float32/float64


def make(rank: int, key: str, numel: int, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    # A stable seed (Python's hash() of a str differs between processes).
    g = torch.Generator().manual_seed(zlib.crc32(f"{rank}|{key}|{numel}|{dtype}".encode()))
    if dtype == torch.bool:
        t = torch.rand(numel, generator=g) > 0.5
    elif dtype.is_complex:
        t = torch.randn(numel, generator=g, dtype=dtype)
    elif dtype.is_floating_point:
        t = torch.randn(numel, generator=g, dtype=torch.float64).to(dtype)
    else:
        t = torch.randint(1, 4, (numel,), generator=g, dtype=torch.int64).to(dtype)
    return t.reshape(shape) if shape else t


def tol(dtype: torch.dtype, world: int) -> dict[str, float]:
    return {torch.float16: dict(rtol=1e-2, atol=1e-2 * world), torch.bfloat16: dict(rtol=5e-2, atol=5e-2 * world),
            torch.float32: dict(rtol=1e-5, atol=1e-5 * world), torch.float64: dict(rtol=1e-12, atol=1e-12 * world),
            torch.complex64: dict(rtol=1e-5, atol=1e-5 * world)}.get(dtype, dict(rtol=0, atol=0))


def compare(name: str, got: Any, ref: Any, exact: bool, world: int) -> str | None:
    if isinstance(got, (list, tuple)):
        if len(got) != len(ref):
            return f"{name}: expected {len(ref)} outputs, got {len(got)}"
        for i, (a, b) in enumerate(zip(got, ref)):
            err = compare(f"{name}[{i}]", a, b, exact, world)
            if err:
                return err
        return None
    if isinstance(got, torch.Tensor):
        if got.dtype != ref.dtype or got.shape != ref.shape:
            return f"{name}: expected {ref.dtype}{tuple(ref.shape)}, got {got.dtype}{tuple(got.shape)}"
        if exact or not (got.dtype.is_floating_point or got.dtype.is_complex):
            same = torch.equal(got, ref) or (got.dtype.is_floating_point and torch.equal(got.isnan(), ref.isnan())
                                              and torch.equal(got.nan_to_num(), ref.nan_to_num()))
            return None if same else f"{name}: not bit-identical to the reference (max diff {(got.double() - ref.double()).abs().max().item() if got.numel() else 0})"
        ok = torch.allclose(got.to(torch.complex128 if got.is_complex() else torch.float64),
                            ref.to(torch.complex128 if ref.is_complex() else torch.float64), **tol(got.dtype, world))
        return None if ok else f"{name}: differs beyond summation-order tolerance (max diff {(got.double() - ref.double()).abs().max().item()})"
    return None if got == ref else f"{name}: expected {ref!r}, got {got!r}"


Case = Callable[[int, int, Any, Any], list[tuple[str, Any, Any, bool]]]
