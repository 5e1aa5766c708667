"""Codec measurement on this CPU and execution of a :class:`~commlayer.adapt.planner.Plan` over a group.

:func:`measure_codec` times a codec's encode/decode on a Gaussian tensor and measures its wire
ratio and relative error (for the cost model and the error-budget policy). :func:`run_allreduce`
runs one all-reduce exactly as a plan says: the exact dense algorithms, or the compressed
all-reduce of :mod:`commlayer.topologies.codec_allreduce`; the operation name carries the plan's
tag, so ranks running different plans fail with a "collective mismatch" error instead of
mixing data.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

from commlayer.adapt.cost import CodecProfile
from commlayer.codecs import CodecContext, aggregation_mode, from_spec
from commlayer.topologies.comm import Group
from commlayer.topologies.dense import allreduce as dense_allreduce
from commlayer.topologies.reduce_ops import ReduceOp, finalize_

logger = logging.getLogger(__name__)


def measure_codec(spec: str, numel: int = 1 << 18, repeats: int = 3, seed: int = 0) -> CodecProfile:
    """Measures ``spec`` on a float32 Gaussian tensor of ``numel`` elements (best of ``repeats``)."""
    if not spec:
        return CodecProfile("")
    codec = from_spec(spec)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g)
    ctx = CodecContext((numel,), torch.float32, key="__adapt_measure__", seed=seed)
    enc_s, dec_s = math.inf, math.inf
    out = x
    for _ in range(max(1, repeats)):
        fresh = from_spec(spec)  # no error-feedback memory between repeats
        t0 = time.perf_counter()
        enc = fresh.encode(x, ctx)
        t1 = time.perf_counter()
        out = fresh.decode(enc, ctx)
        t2 = time.perf_counter()
        enc_s, dec_s = min(enc_s, t1 - t0), min(dec_s, t2 - t1)
    raw = numel * 4
    rel = float((out.float() - x).norm() / x.norm())
    linear = aggregation_mode(codec) == "allreduce"
    return CodecProfile(spec, codec.wire_bytes(numel, torch.float32) / raw, raw / max(enc_s, 1e-9),
                        raw / max(dec_s, 1e-9), rel, linear)


def profile_vector(prof: CodecProfile) -> list[float]:
    """The numbers of a profile that ranks all-gather (so every rank plans with the same ones)."""
    return [prof.ratio, prof.encode_Bps, prof.decode_Bps, prof.rel_error, 1.0 if prof.linear else 0.0]


def merge_profiles(spec: str, vectors: list[list[float]]) -> CodecProfile:
    """The pessimistic profile over ranks: the slowest encode/decode, the largest ratio and error."""
    return CodecProfile(spec, max(v[0] for v in vectors), min(v[1] for v in vectors), min(v[2] for v in vectors),
                        max(v[3] for v in vectors), all(v[4] > 0.5 for v in vectors))


class CodecCache:
    """One codec instance per spec (error-feedback state persists across calls)."""

    def __init__(self) -> None:
        self._codecs: dict[str, Any] = {}

    def get(self, spec: str) -> Any:
        if spec not in self._codecs:
            self._codecs[spec] = from_spec(spec)
        return self._codecs[spec]

    def stats(self) -> list[dict[str, Any]]:
        out = []
        for spec, c in self._codecs.items():
            res = getattr(c, "residuals", None)
            norm = math.sqrt(sum(float(r.float().norm()) ** 2 for r in res.values())) if res else 0.0
            out.append({"codec": spec, "state_bytes": int(c.state_bytes()), "ef_residual_norm": norm})
        return out


def run_allreduce(group: Group, flat: torch.Tensor, op: ReduceOp, plan: Any, codecs: CodecCache | None = None,
                  key: str = "", step: int = 0, seed: int = 0) -> dict[str, Any]:
    """All-reduces the 1-D contiguous ``flat`` in place following ``plan``; returns what happened.

    AVG is finalised (divided) here. A codec plan requires a floating tensor and SUM/AVG.
    """
    name = f"allreduce[{plan.tag}]"
    comm = group.op(name)
    t0 = time.perf_counter()
    info: dict[str, Any] = {"plan": plan.tag, "algo": plan.algo, "codec": plan.codec_spec, "bytes": flat.numel() * flat.element_size()}
    if plan.codec_spec and op in (ReduceOp.SUM, ReduceOp.AVG) and flat.is_floating_point():
        from commlayer.topologies.codec_allreduce import codec_allreduce  # only codec plans need it

        codec = (codecs or CodecCache()).get(plan.codec_spec)
        ctx = CodecContext((flat.numel(),), flat.dtype, key=key, step=step, seed=seed)
        codec_allreduce(comm, flat, codec, ctx, plan.algo, average=op == ReduceOp.AVG, order=plan.ring_order,
                        chunk_bytes=plan.chunk_bytes)
        info["wire_bytes"] = codec.wire_bytes(flat.numel(), flat.dtype)
    else:
        dense_allreduce(comm, flat, op, plan.algo, plan.ring_order, plan.chunk_bytes)
        finalize_(flat, op, group.size)
        info["wire_bytes"] = info["bytes"]
    info["seconds"] = time.perf_counter() - t0
    return info
