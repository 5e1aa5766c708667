"""Gradient compression inside the zmq backend (``COMMLAYER_CODEC`` / ``ZmqOptions.codec``).

Only floating-point all_reduce SUM/AVG of tensors of at least ``codec_min_bytes`` are compressed
(DDP buckets); small tensors, integer/bool tensors, every other op and every other collective
stay exact. All ranks call collectives in the same order, so the per-key step counters (which
seed shared-randomness codecs such as random-k) agree without any message.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from commlayer.codecs import Codec, CodecContext, from_spec
from commlayer.topologies.reduce_ops import ReduceOp

logger = logging.getLogger(__name__)


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
        self._lock = threading.Lock()
        logger.info("zmq backend compresses float all_reduce SUM/AVG >= %d bytes with %r", min_bytes, spec)

    def applies(self, op: ReduceOp, tensor: torch.Tensor, factor: object) -> bool:
        return (op in (ReduceOp.SUM, ReduceOp.AVG) and factor is None and tensor.dtype.is_floating_point
                and tensor.numel() * tensor.element_size() >= self.min_bytes)

    def context(self, flat: torch.Tensor) -> CodecContext:
        key = f"{flat.numel()}:{str(flat.dtype).removeprefix('torch.')}"
        with self._lock:  # numbered in the issuing thread, like the collective itself
            step = self._steps.get(key, 0)
            self._steps[key] = step + 1
            self.stats.calls += 1
            self.stats.input_bytes += flat.numel() * flat.element_size()
            self.stats.wire_bytes += self.codec.wire_bytes(flat.numel(), flat.dtype)
        return CodecContext(shape=tuple(flat.shape), dtype=flat.dtype, key=key, step=step, seed=self.seed)
