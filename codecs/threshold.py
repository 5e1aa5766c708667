"""Threshold sparsification (Strom, "Scalable Distributed DNN Training Using Commodity GPU Cloud
Computing", Interspeech 2015; Dryden et al., MLHPC 2016).

Sends every entry with ``|x_i| >= tau`` (exact values, with indices). The number sent depends on
the data, so :meth:`Threshold.wire_bytes` is an upper bound: all entries kept, or at most
``max_ratio * numel`` when ``max_ratio`` caps the count (then the largest ones are kept). Biased:
use it inside error feedback, as Strom does (``threshold:tau=1e-3+ef``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from commlayer.codecs.base import CodecContext, validate_config_types
from commlayer.codecs.registry import register_codec
from commlayer.codecs.sparse import SparseCodec, check_index_mode, ratio_k
from commlayer.codecs.topk import exact_topk


@dataclass(frozen=True)
class ThresholdConfig:
    """Options of :class:`Threshold`.

    Attributes:
        tau: magnitude threshold (> 0).
        max_ratio: cap on the fraction kept, in (0, 1].
        index: index code, "bits" or "delta".
    """

    tau: float = 1e-3
    max_ratio: float = 1.0
    index: str = "bits"

    def __post_init__(self) -> None:
        validate_config_types(self)
        if self.tau <= 0:
            raise ValueError(f"Expected tau > 0, got {self.tau}")
        if not 0 < self.max_ratio <= 1:
            raise ValueError(f"Expected max_ratio in (0, 1], got {self.max_ratio}")
        check_index_mode(self.index)


@register_codec
class Threshold(SparseCodec):
    """Keeps entries at or above a magnitude threshold; data-dependent size."""

    codec_id = "threshold"
    Config = ThresholdConfig
    fixed_size = False

    def max_kept(self, numel: int) -> int:
        return ratio_k(self.config.max_ratio, numel)

    def select(self, flat: torch.Tensor, ctx: CodecContext) -> torch.Tensor:
        idx = torch.nonzero(flat.abs() >= self.config.tau).squeeze(1)
        cap = self.max_kept(flat.numel())
        if idx.numel() > cap:
            idx = idx[exact_topk(flat[idx], cap)]
        return idx
