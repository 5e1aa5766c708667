"""Chains of codec stages: ``sparse [-> dense] [-> lossless ...]`` or ``dense [-> lossless ...]``.

Two-step compression as in Deep Compression-style pipelines and e.g. "Sparse Binary Compression"
(Sattler et al., 2019): a sparsifier picks coordinates, a quantizer (``int8``, ``qsgd``, ``fp16``,
``sign``...) encodes the kept values, and a lossless stage (``lz4``) squeezes the index arrays.
Capability flags are derived from the stages and the order is checked when the pipeline is built.
Payload: header ``{"h": [stage headers...]}``; buffers are the sparsifier's non-value buffers
followed by the value stage's buffers (each possibly lz4-compressed).
"""

from __future__ import annotations

from typing import Any

import torch

from commlayer.codecs.base import Codec, CodecContext, Encoded, as_array, from_buffer
from commlayer.codecs.registry import get_codec, register_wrapper
from commlayer.codecs.sparse import SparseCodec


class Pipeline(Codec):
    """Several stages acting as one codec. Build with ``from_spec("a|b|c")`` or ``Pipeline([...])``."""

    codec_id = "pipeline"

    def __init__(self, stages: list[Codec]) -> None:
        if not stages:
            raise ValueError("Expected at least one stage, got none")
        for s in stages:
            if not isinstance(s, Codec) or isinstance(s, Pipeline) or s.codec_id == "ef":
                raise ValueError(f"Expected plain codec stages (error feedback wraps the whole pipeline), got {s!r}")
        self.stages = list(stages)
        first = stages[0]
        rest = list(stages[1:])
        self.value_stage: Codec | None = None
        if first.kind == "protocol":
            raise ValueError(f"Stage {first!r} is a multi-round protocol and cannot be chained; use it alone")
        if first.kind == "sparse" and rest and rest[0].kind == "dense":
            self.value_stage = rest.pop(0)
        for s in rest:
            if s.kind != "lossless":
                raise ValueError(
                    f"Stage {s!r} cannot follow {first!r} here: expected the form sparse [| dense] [| lossless...] "
                    "or dense [| lossless...]"
                )
        for s in stages[1:]:
            if s.stateful:
                raise ValueError(f"Stateful stage {s!r} must come first in a pipeline")
        self.lossless = rest
        self.linear = all(s.linear for s in stages)
        self.unbiased = all(s.unbiased for s in stages)
        self.needs_shared_seed = any(s.needs_shared_seed for s in stages)
        self.stateful = any(s.stateful for s in stages)
        self.keeps_residual = bool(getattr(first, "keeps_residual", False))
        self.fixed_size = all(s.fixed_size for s in stages)
        self.kind = first.kind if len(stages) == 1 else "dense"

    @staticmethod
    def check_alone(codec: Codec) -> None:
        """Checks a single-stage codec (every kind may stand alone)."""
        if not isinstance(codec, Codec):
            raise TypeError(f"Expected a Codec, got {type(codec).__name__}")

    def get_config(self) -> dict[str, Any]:
        return {"id": "pipeline", "stages": [s.get_config() for s in self.stages]}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Pipeline":
        return cls([get_codec(c) for c in config.get("stages", [])])

    def to_spec(self) -> str:
        return "|".join(s.to_spec() for s in self.stages)

    # --- helpers ---
    def _vctx(self, ctx: CodecContext, k: int) -> CodecContext:
        return ctx.child("values", (k,))

    def _rest(self) -> int:
        first = self.stages[0]
        return first.n_buffers - 1 if isinstance(first, SparseCodec) else 0

    def encode(self, tensor: torch.Tensor, ctx: CodecContext) -> Encoded:
        first = self.stages[0]
        enc = first.encode(tensor, ctx)
        headers = [enc.header]
        buffers = list(enc.buffers)
        if self.value_stage is not None:
            k = enc.header["k"]
            values = from_buffer(buffers[0], ctx.dtype, k, "values") if k else torch.empty(0, dtype=ctx.dtype)
            ev = self.value_stage.encode(values, self._vctx(ctx, k))
            headers.append(ev.header)
            buffers = buffers[1:] + list(ev.buffers)
        for s in self.lossless:
            enc = s.encode_buffers(Encoded({}, buffers))  # type: ignore[attr-defined]
            headers.append(enc.header)
            buffers = list(enc.buffers)
        return Encoded({"h": headers}, buffers)

    def decode(self, encoded: Encoded, ctx: CodecContext) -> torch.Tensor:
        return self.stages[0].decode(self._first_payload(encoded, ctx), ctx)

    def sparse_parts(self, encoded: Encoded, ctx: CodecContext) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The sparsifier's ``(indices, values)`` once the later stages are undone (None for a dense first stage)."""
        if not isinstance(self.stages[0], SparseCodec):
            return None
        return self.stages[0].sparse_parts(self._first_payload(encoded, ctx), ctx)

    def _first_payload(self, encoded: Encoded, ctx: CodecContext) -> Encoded:
        """The first stage's payload: lossless stages and the value stage undone."""
        headers = encoded.header.get("h") if isinstance(encoded.header, dict) else None
        if not isinstance(headers, list) or len(headers) != len(self.stages) or not all(isinstance(h, dict) for h in headers):
            raise ValueError(f"Malformed pipeline payload: expected {len(self.stages)} stage headers, got {headers!r:.200}")
        buffers = list(encoded.buffers)
        hi = len(headers) - 1
        bound = self.stages[0].wire_bytes(ctx.numel, ctx.dtype) if self.value_stage is None else self._raw_bound(ctx)
        for s in reversed(self.lossless):
            buffers = list(s.decode_buffers(Encoded(headers[hi], buffers), bound).buffers)  # type: ignore[attr-defined]
            hi -= 1
        first = self.stages[0]
        if self.value_stage is not None:
            k = first.kept(headers[0], ctx.numel)  # type: ignore[attr-defined]
            rest = self._rest()
            if len(buffers) < rest:
                raise ValueError(f"Malformed pipeline payload: expected at least {rest} buffers, got {len(buffers)}")
            values = self.value_stage.decode(Encoded(headers[1], buffers[rest:]), self._vctx(ctx, k))
            buffers = [as_array(values)] + buffers[:rest]
        return Encoded(headers[0], buffers)

    def _raw_bound(self, ctx: CodecContext) -> int:
        first = self.stages[0]
        k = first.max_kept(ctx.numel)  # type: ignore[attr-defined]
        return first.other_bytes(ctx.numel) + self.value_stage.wire_bytes(k, ctx.dtype)  # type: ignore[attr-defined,union-attr]

    def wire_bytes(self, numel: int, dtype: torch.dtype) -> int:
        if self.value_stage is None:
            return self.stages[0].wire_bytes(numel, dtype)
        return self._raw_bound(CodecContext((numel,), dtype))

    # --- linear pipelines (randomk | fp16 etc.) ---
    def summable(self, encoded: Encoded, ctx: CodecContext) -> torch.Tensor:
        if not self.linear or self.value_stage is None or self._rest():
            return super().summable(encoded, ctx)
        k = self.stages[0].max_kept(ctx.numel)  # type: ignore[attr-defined]
        return self.value_stage.summable(Encoded(encoded.header["h"][1], encoded.buffers), self._vctx(ctx, k))

    def from_summable(self, tensor: torch.Tensor, ctx: CodecContext) -> Encoded:
        if not self.linear or self.value_stage is None or self._rest():
            return super().from_summable(tensor, ctx)
        k = self.stages[0].max_kept(ctx.numel)  # type: ignore[attr-defined]
        ev = self.value_stage.from_summable(tensor, self._vctx(ctx, k))
        return Encoded({"h": [{"k": k}, ev.header]}, ev.buffers)

    # --- state of a stateful first stage ---
    def state_dict(self) -> dict[str, Any]:
        return self.stages[0].state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stages[0].load_state_dict(state)

    def state_bytes(self) -> int:
        return self.stages[0].state_bytes()


register_wrapper(Pipeline)
