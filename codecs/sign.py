"""1-bit sign compression: signSGD (Bernstein et al., ICML 2018) and scaled sign (EF-signSGD).

``scale=l1`` sends ``(||x||_1 / d) * sign(x)``, the compressor of EF-signSGD (Karimireddy et al.,
"Error Feedback Fixes SignSGD and other Gradient Compression Schemes", ICML 2019, Alg. 1); it is
biased and meant to run inside error feedback (``sign+ef``). ``scale=none`` sends the bare sign
for signSGD with majority vote (Bernstein et al., "signSGD with Majority Vote is Communication
Efficient and Fault Tolerant", ICLR 2019): aggregate with :meth:`Sign.majority_vote` (or sum
:meth:`Sign.votes` across workers and take the sign). Zero counts as positive.
Wire: 1 bit per element (+ one float32 scale for ``l1``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from commlayer.codecs.base import Codec, CodecContext, Encoded, bytes_buffer, chunks, from_buffer, validate_config_types
from commlayer.codecs.bitpack import packed_nbytes
from commlayer.codecs.registry import register_codec

SCALES = ("l1", "none")


@dataclass(frozen=True)
class SignConfig:
    """Options of :class:`Sign`.

    Attributes:
        scale: "l1" (mean absolute value, EF-signSGD) or "none" (bare sign, majority vote).
    """

    scale: str = "l1"

    def __post_init__(self) -> None:
        validate_config_types(self)
        if self.scale not in SCALES:
            raise ValueError(f"Expected scale in {SCALES}, got {self.scale!r}")


@register_codec
class Sign(Codec):
    """Sign bits plus an optional L1 scale."""

    codec_id = "sign"
    Config = SignConfig

    def encode(self, tensor: torch.Tensor, ctx: CodecContext) -> Encoded:
        flat = tensor.detach().reshape(-1)
        bits = np.packbits(torch.signbit(flat).numpy(), bitorder="little")
        if self.config.scale == "none":
            return Encoded({}, [bits])
        n = flat.numel()
        scale = float(torch.linalg.vector_norm(flat.to(torch.float32), ord=1)) / n if n else 0.0
        return Encoded({}, [bits, np.array([scale], dtype=np.float32)])

    def _negative(self, encoded: Encoded, ctx: CodecContext) -> np.ndarray:
        want = 1 if self.config.scale == "none" else 2
        if len(encoded.buffers) != want:
            raise ValueError(f"Malformed sign payload: expected {want} buffers, got {len(encoded.buffers)}")
        packed = bytes_buffer(encoded.buffers[0], packed_nbytes(ctx.numel, 1), "sign bits")
        return np.unpackbits(packed, count=ctx.numel, bitorder="little")

    def decode(self, encoded: Encoded, ctx: CodecContext) -> torch.Tensor:
        want = 1 if self.config.scale == "none" else 2
        if len(encoded.buffers) != want:
            raise ValueError(f"Malformed sign payload: expected {want} buffers, got {len(encoded.buffers)}")
        n = ctx.numel
        packed = bytes_buffer(encoded.buffers[0], packed_nbytes(n, 1), "sign bits")
        scale = 1.0
        if self.config.scale == "l1":
            scale = float(from_buffer(encoded.buffers[1], torch.float32, 1, "sign scale")[0])
        out = torch.empty(n, dtype=ctx.dtype)
        for a, e in chunks(n, 8):
            bits = torch.from_numpy(np.unpackbits(packed[a // 8 : (e + 7) // 8], count=e - a, bitorder="little"))
            torch.add(bits.to(torch.float32).mul_(-2.0 * scale), scale, out=out[a:e])
        return out.reshape(ctx.shape)

    def votes(self, encoded: Encoded, ctx: CodecContext) -> torch.Tensor:
        """The worker's vote, +1/-1 per element (int8): sum these across workers for majority vote."""
        return (1 - 2 * torch.from_numpy(self._negative(encoded, ctx)).to(torch.int8)).reshape(ctx.shape)

    def majority_vote(self, encoded: list[Encoded], ctx: CodecContext) -> torch.Tensor:
        """signSGD majority vote: ``sign(sum of votes)`` in ``ctx.dtype`` (ties give 0)."""
        if not encoded:
            raise ValueError("Expected at least one payload to vote, got none")
        neg = np.zeros(ctx.numel, dtype=np.int32)
        for e in encoded:
            neg += self._negative(e, ctx)
        total = len(encoded) - 2 * torch.from_numpy(neg)
        return torch.sign(total).to(ctx.dtype).reshape(ctx.shape)

    def aggregations(self) -> tuple[str, ...]:
        """``scale=none`` adds ``majority_vote`` (signSGD with majority vote) before ``allgather``."""
        return ("majority_vote", "allgather") if self.config.scale == "none" else super().aggregations()

    def combine(self, mode: str, payloads: list[Encoded], ctx: CodecContext) -> torch.Tensor:
        if mode == "majority_vote" and self.config.scale == "none":
            return self.majority_vote(payloads, ctx)
        return super().combine(mode, payloads, ctx)

    def wire_bytes(self, numel: int, dtype: torch.dtype) -> int:
        return packed_nbytes(numel, 1) + (0 if self.config.scale == "none" else 4)
