"""Bounded codec memory: how many bytes codec state holds, in what dtype, and a hard cap.

Error-feedback residuals (``+ef``), DGC's momentum and residual and PowerSGD's warm-start
matrices live next to the model; on a memory-bound device they must not grow without bound.
The rule (issue 16, part 3): codec state is at most ``max_copies`` copies of the gradients it
compresses, **one by default** (``COMMLAYER_CODEC_MEMORY_COPIES``); a codec that would hold more
raises :class:`CodecMemoryError` naming the state, the limit and the fix, instead of allocating.
Residuals can be stored in bf16/fp16 (``COMMLAYER_EF_DTYPE`` or
``ErrorFeedback(residual_dtype=...)``), which halves them for float32 gradients; the compensation
``g + e`` is still computed in float32.

Who knows the gradient size? :class:`~commlayer.codecs.ef.ErrorFeedback` counts the bytes of the
gradients it has seen per key (so a float32 residual for float16 gradients, two copies, is refused
by default); a caller that knows the model (the streaming DiLoCo sync, a DDP hook) can also set an
absolute budget with :func:`limit_state`, which catches residuals left behind by keys that stopped
being used.
"""

from __future__ import annotations

from typing import Any

from commlayer.codecs.base import Codec
from commlayer.codecs.budget import DTYPES, CodecMemoryError, dtype_name, max_copies, parse_dtype
from commlayer.codecs.ef import ErrorFeedback

__all__ = ["CodecMemoryError", "DTYPES", "check_state", "dtype_name", "limit_state", "max_copies", "parse_dtype", "report"]


def _wrappers(codec: Codec) -> list[Any]:
    """The error-feedback wrappers inside ``codec`` (itself, or a pipeline's first stage)."""
    if isinstance(codec, ErrorFeedback):
        return [codec]
    stages = getattr(codec, "stages", None)
    return [s for s in stages[:1] if isinstance(s, ErrorFeedback)] if stages else []


def total_state_bytes(codec: Codec) -> int:
    """Every byte of codec state: residuals plus the wrapped codec's own state (PowerSGD's ``Q``)."""
    wrappers = _wrappers(codec)
    if wrappers:
        return sum(w.state_bytes() + w.inner.state_bytes() for w in wrappers)
    return int(codec.state_bytes())


def limit_state(codec: Codec, grad_bytes: int, copies: float | None = None) -> int:
    """Caps ``codec``'s state at ``copies`` x ``grad_bytes`` (the model's gradient bytes); returns the cap.

    Error-feedback wrappers refuse to store a residual beyond it; other stateful codecs are checked
    by :func:`check_state` after each use.
    """
    if grad_bytes < 0:
        raise ValueError(f"Expected gradient bytes >= 0, got {grad_bytes}")
    cap = int(max_copies(copies) * grad_bytes)
    for w in _wrappers(codec):
        w.max_state_bytes = cap
    return cap


def check_state(codec: Codec, grad_bytes: int, copies: float | None = None, where: str = "") -> None:
    """Raises :class:`CodecMemoryError` if ``codec`` holds more than ``copies`` x ``grad_bytes`` of state."""
    cap = max_copies(copies) * grad_bytes
    held = total_state_bytes(codec)
    if held > cap:
        raise CodecMemoryError(
            f"{where or 'codec'}: {codec!r} holds {held} bytes of state, {held / max(grad_bytes, 1):.2f} copies of the "
            f"{grad_bytes} bytes of gradients; expected at most {max_copies(copies):g} (COMMLAYER_CODEC_MEMORY_COPIES). "
            "Keep residuals in bf16 (COMMLAYER_EF_DTYPE=bf16), use a codec with less state, or raise the budget")


def report(codec: Codec) -> dict[str, Any]:
    """This rank's codec memory: total state bytes, residual bytes and dtype, gradient bytes seen, copies."""
    wrappers = _wrappers(codec)
    residual = sum(w.state_bytes() for w in wrappers)
    seen = sum(w.grad_bytes_seen() for w in wrappers)
    total = total_state_bytes(codec)
    return {"state_bytes": total, "residual_bytes": residual,
            "residual_dtype": dtype_name(wrappers[0].residual_dtype) if wrappers else "",
            "grad_bytes_seen": seen, "copies": total / seen if seen else 0.0,
            "max_state_bytes": wrappers[0].max_state_bytes if wrappers else None}
