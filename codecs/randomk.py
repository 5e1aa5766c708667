"""Random-k sparsification with a shared seed (Stich et al., "Sparsified SGD with Memory", NeurIPS 2018).

All ranks draw the same ``k`` indices from a private generator seeded by (seed, step, key), so
only the values travel. Because every worker keeps the same coordinates the payloads are
*linear*: a ring allreduce can add them directly. ``scale=true`` multiplies the kept values by
``numel / k`` which makes the codec unbiased (Wangni et al., NeurIPS 2018); the default (false)
is the variant meant for error feedback.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from commlayer.codecs.base import CodecContext, Encoded, as_array, from_buffer, np_generator, validate_config_types
from commlayer.codecs.registry import register_codec
from commlayer.codecs.sparse import SparseCodec, ratio_k


@dataclass(frozen=True)
class RandomKConfig:
    """Options of :class:`RandomK`.

    Attributes:
        ratio: fraction of elements kept, in (0, 1].
        scale: multiply kept values by numel / k (unbiased).
    """

    ratio: float = 0.01
    scale: bool = False

    def __post_init__(self) -> None:
        validate_config_types(self)
        if not 0 < self.ratio <= 1:
            raise ValueError(f"Expected ratio in (0, 1], got {self.ratio}")


@register_codec
class RandomK(SparseCodec):
    """k shared random coordinates; no indices on the wire; linear."""

    codec_id = "randomk"
    Config = RandomKConfig
    n_buffers = 1
    linear = True
    needs_shared_seed = True

    def __init__(self, config: RandomKConfig | None = None, **options: object) -> None:
        super().__init__(config, **options)
        self.unbiased = self.config.scale

    def max_kept(self, numel: int) -> int:
        return ratio_k(self.config.ratio, numel)

    def select(self, flat: torch.Tensor, ctx: CodecContext) -> torch.Tensor:
        n = ctx.numel
        k = self.max_kept(n)
        idx = np_generator(ctx, "randomk").choice(n, size=k, replace=False, shuffle=False) if k < n else np.arange(n)
        return torch.from_numpy(np.sort(idx).astype(np.int64))

    def _factor(self, numel: int) -> float:
        k = self.max_kept(numel)
        return numel / k if self.config.scale and k else 1.0

    def encode(self, tensor: torch.Tensor, ctx: CodecContext) -> Encoded:
        flat = tensor.detach().reshape(-1)
        values = flat[self.select(flat, ctx)]
        if self.config.scale:
            values = values * self._factor(ctx.numel)
        return Encoded({"k": int(values.numel())}, [as_array(values)])

    def sparse_parts(self, encoded: Encoded, ctx: CodecContext) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices, values)``: the indices come from the shared seed, not the wire."""
        if len(encoded.buffers) != 1:
            raise ValueError(f"Malformed randomk payload: expected 1 buffer, got {len(encoded.buffers)}")
        k = self.kept(encoded.header, ctx.numel)
        if k != self.max_kept(ctx.numel):
            raise ValueError(f"Malformed randomk payload: expected k={self.max_kept(ctx.numel)}, got {k}")
        values = from_buffer(encoded.buffers[0], ctx.dtype, k, "randomk values")
        return self.select(torch.empty(ctx.numel, dtype=ctx.dtype), ctx), values

    def decode(self, encoded: Encoded, ctx: CodecContext) -> torch.Tensor:
        idx, values = self.sparse_parts(encoded, ctx)
        out = torch.zeros(ctx.numel, dtype=ctx.dtype)
        out[idx] = values
        return out.reshape(ctx.shape)

    def summable(self, encoded: Encoded, ctx: CodecContext) -> torch.Tensor:
        return from_buffer(encoded.buffers[0], ctx.dtype, self.max_kept(ctx.numel), "randomk values")

    def from_summable(self, tensor: torch.Tensor, ctx: CodecContext) -> Encoded:
        return Encoded({"k": self.max_kept(ctx.numel)}, [as_array(tensor.to(ctx.dtype))])
