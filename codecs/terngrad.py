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
from commlayer.codecs.bitpack import decode_lanes, lane_table, pack_lanes, packed_nbytes
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
        scale = max(abs(float(v)) for v in torch.aminmax(flat)) if n else 0.0
        codes = torch.empty(n, dtype=torch.uint8)
        rng = np_generator(ctx, "terngrad")
        inv = 1.0 / scale if scale > 0 else 0.0
        for a, e in chunks(n):
            c = flat[a:e]
            u = torch.from_numpy(rng.random(e - a, dtype=np.float32))
            keep = (c.abs().mul_(inv) > u).view(torch.uint8)
            neg = torch.signbit(c).view(torch.uint8) & keep
            torch.sub(keep.add_(1), neg, alpha=2, out=codes[a:e])  # 1 + keep * sign: codes 0, 1, 2
        return Encoded({}, [pack_lanes(codes.numpy(), 2), np.array([scale], dtype=np.float32)])

    def decode(self, encoded: Encoded, ctx: CodecContext) -> torch.Tensor:
        n = ctx.numel
        if len(encoded.buffers) != 2:
            raise ValueError(f"Malformed terngrad payload: expected 2 buffers, got {len(encoded.buffers)}")
        packed = bytes_buffer(encoded.buffers[0], packed_nbytes(n, 2), "terngrad codes")
        scale = from_buffer(encoded.buffers[1], torch.float32, 1, "terngrad scale")
        out = torch.empty(n, dtype=ctx.dtype)
        table = lane_table(2, np.array([-1.0, 0.0, 1.0, np.nan], dtype=np.float32) * float(scale[0]))
        for a, e in chunks(n, 4):
            vals = torch.from_numpy(decode_lanes(packed[a // 4 : (e + 3) // 4], 2, e - a, table))
            if bool(torch.isnan(vals).any()):
                raise ValueError("Malformed terngrad payload: expected codes in {0, 1, 2}, got 3")
            out[a:e] = vals
        return out.reshape(ctx.shape)

    def wire_bytes(self, numel: int, dtype: torch.dtype) -> int:
        return packed_nbytes(numel, 2) + 4
