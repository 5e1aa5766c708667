"""TernGrad: stochastic ternarization (Wen et al., NeurIPS 2017).

``g~ = s * sign(g) * b`` with ``s = max|g|`` per tensor and ``b_i ~ Bernoulli(|g_i| / s)``, so
``E[g~] = g`` (Eq. 4 of the paper). Optional layer-wise gradient clipping (Sec. 3.3) first clips
``g`` to ``[-c*sigma, c*sigma]`` (``c = 2.5`` in the paper); with clipping the codec is no longer
unbiased for the raw gradient. Wire: 2 bits per element plus one float32 scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from commlayer.codecs.base import Codec, CodecContext, Encoded, bytes_buffer, chunks, from_buffer, np_generator, validate_config_types
from commlayer.codecs.bitpack import pack_lanes, packed_nbytes, unpack_lanes
from commlayer.codecs.registry import register_codec


@dataclass(frozen=True)
class TernGradConfig:
    """Options of :class:`TernGrad`.

    Attributes:
        clip: ``c`` of the paper's gradient clipping in standard deviations; 0 disables it.
    """

    clip: float = 0.0

    def __post_init__(self) -> None:
        validate_config_types(self)
        if self.clip < 0:
            raise ValueError(f"Expected clip >= 0, got {self.clip}")


@register_codec
class TernGrad(Codec):
    """Unbiased ternary quantizer: {-s, 0, +s}, 2 bits per element."""

    codec_id = "terngrad"
    Config = TernGradConfig

    def __init__(self, config: TernGradConfig | None = None, **options: object) -> None:
        super().__init__(config, **options)
        self.unbiased = self.config.clip == 0

    def encode(self, tensor: torch.Tensor, ctx: CodecContext) -> Encoded:
        flat = tensor.detach().reshape(-1).to(torch.float32)
        n = flat.numel()
        if self.config.clip > 0 and n > 1:
            bound = float(self.config.clip * flat.std())
            flat = flat.clamp(-bound, bound)
        scale = float(flat.abs().max()) if n else 0.0
        codes = torch.empty(n, dtype=torch.uint8)
        rng = np_generator(ctx, "terngrad")
        inv = 1.0 / scale if scale > 0 else 0.0
        for a, e in chunks(n):
            c = flat[a:e]
            u = torch.from_numpy(rng.random(e - a, dtype=np.float32))
            keep = (c.abs() * inv) > u
            codes[a:e] = torch.where(keep, torch.sign(c), torch.zeros_like(c)).add_(1).to(torch.uint8)
        return Encoded({}, [pack_lanes(codes.numpy(), 2), np.array([scale], dtype=np.float32)])

    def decode(self, encoded: Encoded, ctx: CodecContext) -> torch.Tensor:
        n = ctx.numel
        if len(encoded.buffers) != 2:
            raise ValueError(f"Malformed terngrad payload: expected 2 buffers, got {len(encoded.buffers)}")
        packed = bytes_buffer(encoded.buffers[0], packed_nbytes(n, 2), "terngrad codes")
        scale = from_buffer(encoded.buffers[1], torch.float32, 1, "terngrad scale")
        codes = torch.from_numpy(unpack_lanes(packed, 2, n).astype(np.int8))
        if bool((codes > 2).any()):
            raise ValueError("Malformed terngrad payload: expected codes in {0, 1, 2}, got 3")
        return ((codes - 1) * scale).to(ctx.dtype).reshape(ctx.shape)

    def wire_bytes(self, numel: int, dtype: torch.dtype) -> int:
        return packed_nbytes(numel, 2) + 4
