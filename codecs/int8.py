"""8-bit linear quantization with one float32 absmax scale per block.

Block-wise absmax quantization as in Dettmers et al., "8-bit Optimizers via Block-wise
Quantization" (ICLR 2022) (linear code instead of their dynamic one): each block of ``block``
values is scaled by ``max|x| / 127`` and rounded to the nearest integer, so the error of each
element is at most half a step, ``max|x_block| / 254``. Deterministic, hence biased.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from commlayer.codecs.base import Codec, CodecContext, Encoded, chunks, from_buffer, validate_config_types
from commlayer.codecs.registry import register_codec


@dataclass(frozen=True)
class Int8Config:
    """Options of :class:`Int8`.

    Attributes:
        block: elements sharing one scale.
    """

    block: int = 256

    def __post_init__(self) -> None:
        validate_config_types(self)
        if self.block < 1:
            raise ValueError(f"Expected block >= 1, got {self.block}")


@register_codec
class Int8(Codec):
    """int8 with a per-block float32 scale: ``numel + 4 * ceil(numel / block)`` bytes."""

    codec_id = "int8"
    Config = Int8Config

    def encode(self, tensor: torch.Tensor, ctx: CodecContext) -> Encoded:
        b = self.config.block
        flat = tensor.detach().reshape(-1)
        n = flat.numel()
        q = torch.empty(n, dtype=torch.int8)
        scales = torch.empty(-(-n // b), dtype=torch.float32)
        for s, e in chunks(n, b):
            c = flat[s:e].to(torch.float32)
            nb = -(-(e - s) // b)
            pad = nb * b - (e - s)
            if pad:
                c = torch.cat([c, c.new_zeros(pad)])
            c = c.view(nb, b)
            m = c.abs().amax(dim=1)
            scales[s // b : s // b + nb] = m / 127.0
            inv = torch.where(m > 0, 127.0 / m, torch.zeros_like(m))
            y = (c * inv[:, None]).round_().view(-1)
            q[s:e] = y[: e - s]
        return Encoded({}, [q.numpy(), scales.numpy()])

    def decode(self, encoded: Encoded, ctx: CodecContext) -> torch.Tensor:
        b, n = self.config.block, ctx.numel
        if len(encoded.buffers) != 2:
            raise ValueError(f"Malformed int8 payload: expected 2 buffers, got {len(encoded.buffers)}")
        q = from_buffer(encoded.buffers[0], torch.int8, n, "int8 values")
        scales = from_buffer(encoded.buffers[1], torch.float32, -(-n // b), "int8 scales")
        out = torch.empty(n, dtype=ctx.dtype)
        full = n - n % b
        for s, e in chunks(full, b):
            torch.mul(q[s:e].view(-1, b), scales[s // b : e // b, None], out=out[s:e].view(-1, b))
        if full < n:
            out[full:] = q[full:] * scales[-1]
        return out.reshape(ctx.shape)

    def wire_bytes(self, numel: int, dtype: torch.dtype) -> int:
        return numel + 4 * -(-numel // self.config.block)

