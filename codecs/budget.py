"""The primitives of bounded codec memory: the error, the residual dtype names, the copies budget.

:mod:`commlayer.codecs.ef` stores residuals within this budget and :mod:`commlayer.codecs.memory`
measures and caps any codec's state with it; both import these from here (``memory`` re-exports
them), so the error-feedback wrapper sits below the functions that inspect it.
"""

from __future__ import annotations

import torch

from commlayer import settings

#: Names accepted for the residual dtype (``COMMLAYER_EF_DTYPE``); ``auto`` = float32 (float64 for float64 input).
DTYPES: dict[str, torch.dtype | None] = {"auto": None, "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                                        "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
                                        "fp64": torch.float64, "float64": torch.float64}


class CodecMemoryError(MemoryError):
    """Codec state would exceed its budget (a ``MemoryError``; the message says how to fix it)."""


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """A residual dtype from a name (``auto``/``fp32``/``bf16``/``fp16``/``fp64``), a dtype, or None (= the setting)."""
    if isinstance(name, torch.dtype):
        if not name.is_floating_point:
            raise ValueError(f"Expected a floating residual dtype, got {name}")
        return name
    raw = settings.get("COMMLAYER_EF_DTYPE") if name is None else name
    try:
        return DTYPES[str(raw).strip().lower()]
    except KeyError:
        raise ValueError(f"Expected a residual dtype in {sorted(DTYPES)}, got {raw!r} (COMMLAYER_EF_DTYPE)") from None


def dtype_name(dtype: torch.dtype | None) -> str:
    """``float32``-style name (``auto`` for None)."""
    return "auto" if dtype is None else str(dtype).removeprefix("torch.")


def max_copies(value: float | None = None) -> float:
    """The copies-of-the-gradients budget: ``value``, or ``COMMLAYER_CODEC_MEMORY_COPIES``; must be > 0."""
    v = float(settings.get("COMMLAYER_CODEC_MEMORY_COPIES")) if value is None else float(value)
    if not v > 0:
        raise ValueError(f"Expected a codec memory budget > 0 copies of the gradients, got {v} (COMMLAYER_CODEC_MEMORY_COPIES)")
    return v

