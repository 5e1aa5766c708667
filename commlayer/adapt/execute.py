"""Codec measurement on this CPU and execution of a :class:`~commlayer.adapt.planner.Plan` over a group.

:func:`measure_codec` times a codec's encode/decode on a Gaussian tensor and measures its wire
ratio and relative error (for the cost model and the error-budget policy). :func:`execute`
is the one plan executor (the backend's adaptive all-reduce and :func:`run_allreduce` of the
tests and benchmarks): it runs one all-reduce exactly as a plan says, the plan's registered
algorithm exactly or carrying the compressed all-reduce of
:mod:`commlayer.topologies.codec_allreduce`; the operation name carries the plan's tag, so ranks
running different plans fail with a "collective mismatch" error instead of mixing data.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

from commlayer.adapt.cost import CodecProfile
from commlayer.codecs import CodecContext, aggregation_mode, from_spec
from commlayer.topologies.comm import Group, OpComm
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


def execute(comm: OpComm, flat: torch.Tensor, op: ReduceOp, plan: Any, codec: Any = None,
            ctx: CodecContext | None = None) -> dict[str, Any]:
    """Runs one all-reduce exactly as ``plan`` says on ``comm``: the one plan executor.

    The backend's adaptive all-reduce and :func:`run_allreduce` (tests, benchmarks) both call it.
    The operation name gets the plan's tag, so ranks on different plans fail with "collective
    mismatch" instead of mixing data. AVG is left as a SUM for exact plans (the caller finalises);
    a codec plan (``codec`` and ``ctx`` given, floating SUM/AVG) averages itself.

    Returns:
        What happened: plan tag, algorithm, codec, raw and wire bytes, seconds.
    """
    comm.op = f"{comm.op}[{plan.tag}]"  # a rank on another plan version raises "collective mismatch"
    nbytes = flat.numel() * flat.element_size()
    info: dict[str, Any] = {"plan": plan.tag, "algo": plan.algo, "codec": plan.codec_spec,
                            "bytes": nbytes}
    t0 = time.perf_counter()
    if codec is not None:
        if ctx is None or op not in (ReduceOp.SUM, ReduceOp.AVG) or not flat.is_floating_point():
            raise ValueError(f"Expected a context and a floating SUM/AVG for codec plan {plan.tag}, got {op.value} on {flat.dtype}")
        from commlayer.topologies.codec_allreduce import codec_allreduce  # only codec plans need it

        codec_allreduce(comm, flat, codec, ctx, plan.algo, average=op == ReduceOp.AVG, order=plan.ring_order,
                        chunk_bytes=plan.chunk_bytes)
        info["wire_bytes"] = codec.wire_bytes(flat.numel(), flat.dtype)
    else:
        dense_allreduce(comm, flat, op, plan.algo, plan.ring_order, plan.chunk_bytes)
        info["wire_bytes"] = nbytes
    info["seconds"] = time.perf_counter() - t0
    return info


def run_allreduce(group: Group, flat: torch.Tensor, op: ReduceOp, plan: Any, codecs: CodecCache | None = None,
                  key: str = "", step: int = 0, seed: int = 0) -> dict[str, Any]:
    """All-reduces the 1-D contiguous ``flat`` in place following ``plan`` (:func:`execute`); returns what happened.

    AVG is finalised (divided) here. A codec plan applies to a floating tensor with SUM/AVG; other
    tensors and ops run the plan's algorithm exactly.
    """
    comm = group.op("allreduce")
    if plan.codec_spec and op in (ReduceOp.SUM, ReduceOp.AVG) and flat.is_floating_point():
        codec = (codecs or CodecCache()).get(plan.codec_spec)
        return execute(comm, flat, op, plan, codec, CodecContext((flat.numel(),), flat.dtype, key=key, step=step, seed=seed))
    info = execute(comm, flat, op, plan)
    finalize_(flat, op, group.size)
    return info
