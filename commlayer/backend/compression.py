"""Gradient compression inside the zmq backend (``COMMLAYER_CODEC`` / ``ZmqOptions.codec``).

Only floating-point all_reduce SUM/AVG of tensors of at least ``codec_min_bytes`` are compressed
(DDP buckets); small tensors, integer/bool tensors, every other op and every other collective
stay exact. All ranks call collectives in the same order, so the per-key step counters (which
seed shared-randomness codecs such as random-k) agree without any message.

A codec that cannot shrink a tensor it is given (PowerSGD on a short vector, a sparsifier whose
payload is not smaller than the tensor) is never a silent no-op: the first such tensor of each
kind logs a warning and raises a :class:`CodecNotApplied` warning that says why
(:func:`why_not`). ``wire_bytes`` in the statistics are the payload bytes of that tensor's shape.
"""

from __future__ import annotations

import logging
import math
import threading
import warnings
from dataclasses import dataclass

import torch

from commlayer.codecs import Codec, CodecContext, from_spec
from commlayer.codecs.powersgd import shape_wire_bytes as wire_bytes
from commlayer.topologies.reduce_ops import ReduceOp

logger = logging.getLogger(__name__)


class CodecNotApplied(UserWarning):
    """A configured codec sends a tensor uncompressed (the message says which and why)."""


def _inner(codec: Codec) -> Codec:
    inner = getattr(codec, "inner", None)  # error feedback wraps the compressor
    return inner if isinstance(inner, Codec) else codec


def why_not(codec: Codec, shape: tuple[int, ...], dtype: torch.dtype) -> str:
    """Why ``codec`` would send a tensor of ``shape`` without shrinking it ("" when it compresses)."""
    explain = getattr(_inner(codec), "why_not", None)
    if callable(explain):
        return str(explain(shape))
    raw = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
    wire = wire_bytes(codec, shape, dtype)
    return f"its payload ({wire} bytes) would not be smaller than the tensor ({raw} bytes)" if wire >= raw else ""


def warn_not_applied(spec: str, shape: tuple[int, ...], dtype: torch.dtype, reason: str, seen: set[str]) -> None:
    """Logs and warns once per ``(spec, reason)`` that ``spec`` sends a tensor uncompressed."""
    if reason in seen:
        return
    seen.add(reason)
    msg = (f"codec {spec!r} does not compress an all_reduce of shape {tuple(shape)} ({dtype}): {reason}; "
           f"it is sent uncompressed")
    logger.warning(msg)
    warnings.warn(msg, CodecNotApplied, stacklevel=3)


@dataclass
class CompressionStats:
    calls: int = 0
    input_bytes: int = 0
    wire_bytes: int = 0


class BackendCompression:
    """The codec of one process group and its per-key step counters.

    Error-feedback residuals and other codec state are kept per key ``"<numel>:<dtype>"``: DDP
    buckets of distinct sizes each get their own. (Equal-sized buckets would share a residual;
    the DDP hook in ``commlayer.hooks`` keys by bucket index instead.)
    """

    def __init__(self, spec: str, min_bytes: int, seed: int = 0) -> None:
        self.spec = spec
        self.codec: Codec = from_spec(spec)
        self.min_bytes = min_bytes
        self.seed = seed
        self.stats = CompressionStats()
        self._steps: dict[str, int] = {}
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        logger.info("zmq backend compresses float all_reduce SUM/AVG >= %d bytes with %r", min_bytes, spec)

    def applies(self, op: ReduceOp, tensor: torch.Tensor, factor: object) -> bool:
        return (op in (ReduceOp.SUM, ReduceOp.AVG) and factor is None and tensor.dtype.is_floating_point
                and tensor.numel() * tensor.element_size() >= self.min_bytes)

    def context(self, flat: torch.Tensor) -> CodecContext:
        key = f"{flat.numel()}:{str(flat.dtype).removeprefix('torch.')}"
        shape = tuple(flat.shape)
        with self._lock:  # numbered in the issuing thread, like the collective itself
            step = self._steps.get(key, 0)
            self._steps[key] = step + 1
            self.stats.calls += 1
            self.stats.input_bytes += flat.numel() * flat.element_size()
            self.stats.wire_bytes += wire_bytes(self.codec, shape, flat.dtype)
            if step == 0:
                reason = why_not(self.codec, shape, flat.dtype)
                if reason:
                    warn_not_applied(self.spec, shape, flat.dtype, reason, self._warned)
        return CodecContext(shape=tuple(flat.shape), dtype=flat.dtype, key=key, step=step, seed=self.seed)
