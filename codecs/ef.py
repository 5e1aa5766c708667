"""Error feedback (memory) around any codec.

1-bit SGD with error feedback (Seide et al., Interspeech 2014) and its analysis for biased
compressors (Karimireddy et al., "Error Feedback Fixes SignSGD...", ICML 2019, Alg. 2; Stich et
al., NeurIPS 2018): with residual ``e`` per tensor key,
``p = g + e;  send C(p);  e <- p - decode(C(p))``. Hence after any number of steps
``sum(sent) + e = sum(g)`` (the invariant the tests check). ``p`` is computed in float32 (or
float64 for float64 tensors) whatever the gradient dtype; the residual is stored in
``residual_dtype`` (default ``COMMLAYER_EF_DTYPE``; ``auto`` = that accumulation dtype for
float32/float64 gradients and the gradient's own dtype for bf16/fp16 ones, so the residuals are
one copy of the gradients; ``bf16``/``fp16`` halve a float32 model's, and the invariant then holds
up to one rounding of ``e`` per step).

Memory is bounded (:mod:`commlayer.codecs.memory`): the residuals are at most ``max_copies``
copies (default ``COMMLAYER_CODEC_MEMORY_COPIES`` = 1) of the gradient bytes seen, and all state
(residuals + the wrapped codec's, e.g. PowerSGD's ``Q``) at most ``max_state_bytes`` if a caller
set it; a residual that would exceed either raises
:class:`~commlayer.codecs.memory.CodecMemoryError` before it is stored. ``compensate``/``update``
are public so multi-round protocols (PowerSGD) can apply their own reconstruction.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from commlayer.codecs.base import Codec, CodecContext, Encoded, acc_dtype
from commlayer.codecs.budget import CodecMemoryError, dtype_name, parse_dtype
from commlayer.codecs.budget import max_copies as budget_copies
from commlayer.codecs.registry import get_codec, register_wrapper

logger = logging.getLogger(__name__)


class ErrorFeedback(Codec):
    """Wraps ``inner``; ``encode`` adds and updates the residual of ``ctx.key``.

    Capability flags follow ``inner`` except: ``stateful`` (True) and ``unbiased`` (False).

    Args:
        inner: the codec to wrap.
        residual_dtype: storage dtype of the residuals (``torch.bfloat16``, ``"bf16"``, ``"auto"``...);
            None reads ``COMMLAYER_EF_DTYPE``.
        max_copies: state budget in copies of the gradient bytes seen; None reads
            ``COMMLAYER_CODEC_MEMORY_COPIES`` (default 1).
        max_state_bytes: absolute budget in bytes (None: none), e.g. one copy of the model's gradients.
    """

    codec_id = "ef"
    stateful = True
    unbiased = False

    def __init__(self, inner: Codec, residual_dtype: torch.dtype | str | None = None, max_copies: float | None = None,
                 max_state_bytes: int | None = None) -> None:
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
        self.residual_dtype = parse_dtype(residual_dtype)
        self.max_copies = budget_copies(max_copies)
        self.max_state_bytes = max_state_bytes
        self._grad_bytes: dict[str, int] = {}
        self._in_dtype: dict[str, torch.dtype] = {}

    def get_config(self) -> dict[str, Any]:
        return {"id": "ef", "codec": self.inner.get_config()}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ErrorFeedback":
        return cls(get_codec(config["codec"]))

    def to_spec(self) -> str:
        return self.inner.to_spec() + "+ef"

    @staticmethod
    def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
        return acc_dtype(dtype)

    def compensate(self, tensor: torch.Tensor, key: str) -> torch.Tensor:
        """``tensor + residual[key]`` in the accumulation dtype (a new tensor)."""
        self.note_input(tensor, key)
        p = tensor.detach().to(self._acc_dtype(tensor.dtype), copy=True)
        e = self.residuals.get(key)
        if e is not None:
            if e.shape != p.shape:
                raise ValueError(f"Expected residual of shape {tuple(p.shape)} for key {key!r}, got {tuple(e.shape)}")
            p += e.to(p.dtype)
        return p

    def update(self, key: str, compensated: torch.Tensor, sent: torch.Tensor) -> None:
        """Stores ``residual[key] = compensated - sent`` (in the residual dtype), within the budget."""
        e = compensated - sent.to(compensated.dtype)
        store = self.residual_dtype or self._in_dtype.get(key, e.dtype)
        if store.itemsize < 4 and self.residual_dtype is None and e.dtype.itemsize >= 4:
            e = e.to(store)  # auto: a half-precision gradient keeps a half-precision residual (one copy)
        elif self.residual_dtype is not None and e.dtype != store:
            e = e.to(store)
        self._check(key, e)
        self.residuals[key] = e

    def _check(self, key: str, e: torch.Tensor) -> None:
        old = self.residuals.get(key)
        residuals = self.state_bytes() - (old.numel() * old.element_size() if old is not None else 0) + e.numel() * e.element_size()
        held = residuals + self.inner.state_bytes()
        seen = self.grad_bytes_seen()
        if seen and residuals > self.max_copies * seen:
            raise CodecMemoryError(
                f"error feedback for key {key!r}: residuals would be {residuals} bytes ({dtype_name(e.dtype)}), "
                f"{residuals / seen:.2f} copies of the {seen} bytes of gradients it compresses; expected at most "
                f"{self.max_copies:g}. Keep residuals in the gradient dtype (ErrorFeedback(residual_dtype=...), "
                f"COMMLAYER_EF_DTYPE=bf16/fp16) or allow more (max_copies=, COMMLAYER_CODEC_MEMORY_COPIES)")
        if self.max_state_bytes is not None and held > self.max_state_bytes:
            raise CodecMemoryError(
                f"error feedback for key {key!r}: state would be {held} bytes over {len(self.residuals) + (old is None)} keys, "
                f"above its budget of {self.max_state_bytes} bytes (one copy of the model's gradients); residuals of keys "
                "no longer used? call reset(), keep residuals in bf16 (COMMLAYER_EF_DTYPE=bf16) or raise the budget")

    def grad_bytes_seen(self) -> int:
        """Bytes of the gradients encoded so far, one tensor per key (what the residuals shadow)."""
        return sum(self._grad_bytes.values())

    def note_input(self, tensor: torch.Tensor, key: str) -> None:
        """Records the size of the gradient behind ``key`` (``compensate`` does it; multi-round protocols too)."""
        self._grad_bytes[key] = tensor.numel() * tensor.element_size()
        self._in_dtype[key] = tensor.dtype

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
        if name in ("inner", "residuals", "residual_dtype", "max_copies", "max_state_bytes", "_grad_bytes", "_in_dtype"):
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
        self._grad_bytes.clear()
        self._in_dtype.clear()


register_wrapper(ErrorFeedback)
