"""Error feedback (memory) around any codec.

1-bit SGD with error feedback (Seide et al., Interspeech 2014) and its analysis for biased
compressors (Karimireddy et al., "Error Feedback Fixes SignSGD...", ICML 2019, Alg. 2; Stich et
al., NeurIPS 2018): with residual ``e`` per tensor key,
``p = g + e;  send C(p);  e <- p - decode(C(p))``. Hence after any number of steps
``sum(sent) + e = sum(g)`` (the invariant the tests check). The residual is kept in float32 (or
float64 for float64 tensors) whatever the gradient dtype. ``compensate``/``update`` are public so
multi-round protocols (PowerSGD) can apply their own reconstruction.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from commlayer.codecs.base import Codec, CodecContext, Encoded, acc_dtype

logger = logging.getLogger(__name__)


class ErrorFeedback(Codec):
    """Wraps ``inner``; ``encode`` adds and updates the residual of ``ctx.key``.

    Capability flags follow ``inner`` except: ``stateful`` (True) and ``unbiased`` (False).
    """

    codec_id = "ef"
    stateful = True
    unbiased = False

    def __init__(self, inner: Codec) -> None:
        if not isinstance(inner, Codec):
            raise TypeError(f"Expected a Codec to wrap, got {type(inner).__name__}")
        if isinstance(inner, ErrorFeedback):
            raise ValueError("Expected a codec without error feedback, got one already wrapped in '+ef'")
        if getattr(inner, "keeps_residual", False):
            raise ValueError(f"Codec {inner!r} keeps its own residual/state; drop '+ef'")
        self.inner = inner
        self.kind = inner.kind
        self.linear = inner.linear
        self.needs_shared_seed = inner.needs_shared_seed
        self.fixed_size = inner.fixed_size
        self.residuals: dict[str, torch.Tensor] = {}

    def get_config(self) -> dict[str, Any]:
        return {"id": "ef", "codec": self.inner.get_config()}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ErrorFeedback":
        from commlayer.codecs.registry import get_codec

        return cls(get_codec(config["codec"]))

    @staticmethod
    def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
        return acc_dtype(dtype)

    def compensate(self, tensor: torch.Tensor, key: str) -> torch.Tensor:
        """``tensor + residual[key]`` in the accumulation dtype (a new tensor)."""
        p = tensor.detach().to(self._acc_dtype(tensor.dtype), copy=True)
        e = self.residuals.get(key)
        if e is not None:
            if e.shape != p.shape:
                raise ValueError(f"Expected residual of shape {tuple(p.shape)} for key {key!r}, got {tuple(e.shape)}")
            p += e
        return p

    def update(self, key: str, compensated: torch.Tensor, sent: torch.Tensor) -> None:
        """Stores ``residual[key] = compensated - sent``."""
        self.residuals[key] = compensated - sent.to(compensated.dtype)

    def encode(self, tensor: torch.Tensor, ctx: CodecContext) -> Encoded:
        p = self.compensate(tensor, ctx.key)
        enc = self.inner.encode(p.to(ctx.dtype), ctx)
        self.update(ctx.key, p, self.inner.decode(enc, ctx))
        return enc

    def decode(self, encoded: Encoded, ctx: CodecContext) -> torch.Tensor:
        return self.inner.decode(encoded, ctx)

    def wire_bytes(self, numel: int, dtype: torch.dtype) -> int:
        return self.inner.wire_bytes(numel, dtype)

    def summable(self, encoded: Encoded, ctx: CodecContext) -> torch.Tensor:
        return self.inner.summable(encoded, ctx)

    def from_summable(self, tensor: torch.Tensor, ctx: CodecContext) -> Encoded:
        return self.inner.from_summable(tensor, ctx)

    def aggregations(self) -> tuple[str, ...]:
        return self.inner.aggregations()

    def combine(self, mode: str, payloads: list[Encoded], ctx: CodecContext) -> torch.Tensor:
        return self.inner.combine(mode, payloads, ctx)

    def rounds(self, mode: str, tensors: list[torch.Tensor], ctxs: list[CodecContext], outer: Codec | None = None) -> Any:
        return self.inner.rounds(mode, tensors, ctxs, outer=self)

    def sparse_parts(self, encoded: Encoded, ctx: CodecContext) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.inner.sparse_parts(encoded, ctx)

    def __getattr__(self, name: str) -> Any:
        # Expose the inner codec's extra API (Sign.majority_vote, PowerSGD protocol...).
        if name in ("inner", "residuals"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def state_dict(self) -> dict[str, Any]:
        """``{"residuals": {key: tensor}}`` (tensors are copies)."""
        return {"residuals": {k: v.clone() for k, v in self.residuals.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        res = state.get("residuals") if isinstance(state, dict) else None
        if not isinstance(res, dict) or not all(isinstance(v, torch.Tensor) for v in res.values()):
            raise ValueError(f"Expected {{'residuals': {{key: tensor}}}}, got {type(state).__name__}")
        self.residuals = {str(k): v.clone() for k, v in res.items()}

    def state_bytes(self) -> int:
        """Bytes held by the residuals."""
        return sum(v.numel() * v.element_size() for v in self.residuals.values())

    def reset(self) -> None:
        """Drops every residual."""
        self.residuals.clear()
