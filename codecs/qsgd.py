"""QSGD: stochastic uniform quantization to ``s`` levels (Alistarh et al., NeurIPS 2017).

Per bucket ``v`` of ``bucket`` consecutive values (the paper's bucketing, Sec. 3.1),
``Q(v_i) = ||v||_2 * sign(v_i) * xi_i / s`` with ``xi_i = l + 1`` with probability
``|v_i| s / ||v|| - l`` and ``l`` otherwise (``l = floor(|v_i| s / ||v||)``). Lemma 3.1:
``E[Q(v)] = v`` and ``E||Q(v) - v||^2 <= min(d / s^2, sqrt(d) / s) ||v||^2`` for bucket size d.
Wire format: the signed level in a fixed-width lane (2/4/8/16 bits, instead of the paper's Elias
code) plus one float32 norm per bucket. Randomness comes from a private generator seeded by
(seed, step, key).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from commlayer.codecs.base import Codec, CodecContext, Encoded, bytes_buffer, chunks, from_buffer, np_generator, validate_config_types
from commlayer.codecs.bitpack import decode_lanes, lane_table, lane_width, pack_lanes, packed_nbytes, unpack_lanes
from commlayer.codecs.registry import register_codec


@dataclass(frozen=True)
class QSGDConfig:
    """Options of :class:`QSGD`.

    Attributes:
        levels: ``s``, the number of positive quantization levels (1..32767).
        bucket: values sharing one norm (``d`` in the variance bound).
    """

    levels: int = 7
    bucket: int = 512

    def __post_init__(self) -> None:
        validate_config_types(self)
        if not 1 <= self.levels <= 32767:
            raise ValueError(f"Expected levels in [1, 32767], got {self.levels}")
        if self.bucket < 1:
            raise ValueError(f"Expected bucket >= 1, got {self.bucket}")


@register_codec
class QSGD(Codec):
    """Unbiased stochastic ``s``-level quantizer with per-bucket L2 norms."""

    codec_id = "qsgd"
    Config = QSGDConfig
    unbiased = True

    @property
    def width(self) -> int:
        """Bits per element (lane width holding the 2s+1 signed levels)."""
        return lane_width(2 * self.config.levels + 1)

    def encode(self, tensor: torch.Tensor, ctx: CodecContext) -> Encoded:
        s, d = self.config.levels, self.config.bucket
        flat = tensor.detach().reshape(-1)
        n = flat.numel()
        codes = torch.empty(n, dtype=torch.int32 if self.width == 16 else torch.uint8)
        norms = torch.empty(-(-n // d), dtype=torch.float32)
        rng = np_generator(ctx, "qsgd")
        for a, e in chunks(n, d):
            c = flat[a:e].to(torch.float32)
            nb = -(-(e - a) // d)
            if nb * d > e - a:
                c = torch.cat([c, c.new_zeros(nb * d - (e - a))])
            c = c.view(nb, d)
            norm = torch.linalg.vector_norm(c, dim=1)
            norms[a // d : a // d + nb] = norm
            inv = torch.where(norm > 0, s / norm, torch.zeros_like(norm))
            u = torch.from_numpy(rng.random(nb * d, dtype=np.float32)).view(nb, d)
            lvl = (c.abs() * inv[:, None]).add_(u).floor_().clamp_(max=s).copysign_(c).add_(s)
            codes[a:e] = lvl.view(-1)[: e - a].to(codes.dtype)
        packed = pack_lanes(codes.numpy(), self.width)
        return Encoded({}, [packed, norms.numpy()])

    def decode(self, encoded: Encoded, ctx: CodecContext) -> torch.Tensor:
        s, d, n = self.config.levels, self.config.bucket, ctx.numel
        if len(encoded.buffers) != 2:
            raise ValueError(f"Malformed qsgd payload: expected 2 buffers, got {len(encoded.buffers)}")
        packed = bytes_buffer(encoded.buffers[0], packed_nbytes(n, self.width), "qsgd levels")
        norms = from_buffer(encoded.buffers[1], torch.float32, -(-n // d), "qsgd norms")
        step = norms / s
        out = torch.empty(n, dtype=ctx.dtype)
        w = self.width
        if w < 16:  # byte -> levels table; codes above 2s decode to NaN and are rejected
            levels = np.arange(1 << w, dtype=np.float32) - s
            levels[2 * s + 1 :] = np.nan
            table = lane_table(w, levels)
        for a, e in chunks(n, d * 8):  # chunk starts are multiples of 8 elements: whole bytes
            seg = packed[a * w // 8 : (e * w + 7) // 8]
            if w < 16:
                lv = torch.from_numpy(decode_lanes(seg, w, e - a, table))
            else:
                lv = torch.from_numpy(unpack_lanes(seg, w, e - a).astype(np.float32)).sub_(s)
            if bool(torch.isnan(lv).any()) or (w == 16 and bool((lv.abs() > s).any())):
                raise ValueError(f"Malformed qsgd payload: expected levels in [-{s}, {s}]")
            nb = (e - a) // d
            if nb:
                torch.mul(lv[: nb * d].view(nb, d), step[a // d : a // d + nb, None], out=out[a : a + nb * d].view(nb, d))
            if a + nb * d < e:
                out[a + nb * d : e] = lv[nb * d :] * step[-1]
        return out.reshape(ctx.shape)

    def wire_bytes(self, numel: int, dtype: torch.dtype) -> int:
        return packed_nbytes(numel, self.width) + 4 * -(-numel // self.config.bucket)

    def variance_bound(self, d: int | None = None) -> float:
        """Lemma 3.1 factor: ``E||Q(v)-v||^2 <= factor * ||v||^2`` for one bucket of size ``d``."""
        d = d or self.config.bucket
        s = self.config.levels
        return min(d / s**2, d**0.5 / s)
