"""Exact top-k sparsification (Aji & Heafield, EMNLP 2017; with memory: Stich et al., NeurIPS 2018).

Keeps the ``k = ceil(ratio * numel)`` entries of largest magnitude. Biased: use it inside error
feedback (``topk:ratio=0.01+ef``). For speed on large tensors it first estimates a threshold from
a random sample, gathers every element at or above it and runs the exact ``torch.topk`` on those
candidates only; if fewer than ``k`` candidates pass (unlikely: the sample quantile is taken with
a safety margin) it falls back to ``torch.topk`` on everything. Either way the result is the exact
top-k (ties broken arbitrarily).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from commlayer.codecs.base import CodecContext, chunks, torch_generator, validate_config_types
from commlayer.codecs.registry import register_codec
from commlayer.codecs.sparse import SparseCodec, check_index_mode, ratio_k


@dataclass(frozen=True)
class TopKConfig:
    """Options of :class:`TopK`.

    Attributes:
        ratio: fraction of elements kept, in (0, 1].
        index: index code, "bits" or "delta" (see :mod:`commlayer.codecs.sparse`).
    """

    ratio: float = 0.01
    index: str = "bits"

    def __post_init__(self) -> None:
        validate_config_types(self)
        if not 0 < self.ratio <= 1:
            raise ValueError(f"Expected ratio in (0, 1], got {self.ratio}")
        check_index_mode(self.index)


def exact_topk(flat: torch.Tensor, k: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Ascending indices of the ``k`` largest ``|flat|`` (exact; sampled preselection when large)."""
    n = flat.numel()
    if k >= n:
        return torch.arange(n)
    if n < 1 << 17 or k > n // 16:
        return torch.topk(flat.abs(), k, sorted=False).indices.sort().values
    m = 1 << 14
    sample = flat[torch.randint(0, n, (m,), generator=gen)].abs().float()
    ks = k * m / n
    rank = min(m, int(ks + 4 * math.sqrt(ks) + 8))  # generous margin below the k-th value
    thr = torch.topk(sample, rank, sorted=False).values.min()
    cand_idx, cand_val = [], []
    for a, e in chunks(n):
        c = flat[a:e].abs()
        hit = torch.nonzero(c >= thr).squeeze(1)
        cand_idx.append(hit + a)
        cand_val.append(c[hit])
    idx = torch.cat(cand_idx)
    if idx.numel() < k:
        return torch.topk(flat.abs(), k, sorted=False).indices.sort().values
    sel = torch.topk(torch.cat(cand_val), k, sorted=False).indices
    return idx[sel].sort().values


@register_codec
class TopK(SparseCodec):
    """Exact top-k by magnitude."""

    codec_id = "topk"
    Config = TopKConfig

    def max_kept(self, numel: int) -> int:
        return ratio_k(self.config.ratio, numel)

    def select(self, flat: torch.Tensor, ctx: CodecContext) -> torch.Tensor:
        return exact_topk(flat, self.max_kept(flat.numel()), torch_generator(ctx, "topk"))
