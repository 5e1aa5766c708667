"""Lossless pass-through and half-precision casts.

``fp16`` is the cast used by PyTorch's ``fp16_compress_hook``; ``bf16`` keeps the float32 exponent
range (Kalamkar et al., "A Study of BFLOAT16 for Deep Learning Training", 2019). Both are
*linear*: payloads are summed in float32 and rounded back, so a ring allreduce can carry them.
Values beyond the float16 range (65504) become inf; scale the loss if that matters.
"""

from __future__ import annotations

import torch

from commlayer.codecs.base import Codec, CodecContext, Encoded, as_array, from_buffer, itemsize
from commlayer.codecs.registry import register_codec


class _Cast(Codec):
    """Sends the tensor in ``wire_dtype`` (``None``: the tensor's own dtype)."""

    wire_dtype: torch.dtype | None = None
    linear = True

    def _dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.wire_dtype or dtype

    def encode(self, tensor: torch.Tensor, ctx: CodecContext) -> Encoded:
        return Encoded({}, [as_array(tensor.detach().reshape(-1).to(self._dtype(ctx.dtype)))])

    def decode(self, encoded: Encoded, ctx: CodecContext) -> torch.Tensor:
        if len(encoded.buffers) != 1:
            raise ValueError(f"Malformed {self.codec_id} payload: expected 1 buffer, got {len(encoded.buffers)}")
        t = from_buffer(encoded.buffers[0], self._dtype(ctx.dtype), ctx.numel, f"{self.codec_id} values")
        return t.to(ctx.dtype, copy=True).reshape(ctx.shape)

    def wire_bytes(self, numel: int, dtype: torch.dtype) -> int:
        return numel * itemsize(self._dtype(dtype))

    def summable(self, encoded: Encoded, ctx: CodecContext) -> torch.Tensor:
        return from_buffer(encoded.buffers[0], self._dtype(ctx.dtype), ctx.numel, f"{self.codec_id} values")

    def from_summable(self, tensor: torch.Tensor, ctx: CodecContext) -> Encoded:
        return Encoded({}, [as_array(tensor.reshape(-1).to(self._dtype(ctx.dtype)))])


@register_codec
class Identity(_Cast):
    """No compression (the dense baseline); lossless, linear, unbiased."""

    codec_id = "identity"
    unbiased = True


@register_codec
class FP16(_Cast):
    """IEEE half precision (round to nearest): 2 bytes per element, linear."""

    codec_id = "fp16"
    wire_dtype = torch.float16


@register_codec
class BF16(_Cast):
    """bfloat16 (round to nearest): 2 bytes per element, float32 range, linear."""

    codec_id = "bf16"
    wire_dtype = torch.bfloat16
