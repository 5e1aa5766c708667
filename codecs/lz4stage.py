"""Lossless LZ4 stage (block format), with optional byte shuffling (as in Blosc).

Applied to every buffer of the previous stage; each buffer is kept compressed only where that
pays (compressed size < raw size), so ``wire_bytes`` is the previous stage's bound. Byte
shuffling groups byte ``j`` of every element together first, which turns the mostly-zero high
bytes of ``index=delta`` gaps or small ints into long runs LZ4 can squeeze. Alone (``lz4``) it
compresses the raw tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lz4.block
import numpy as np
import torch

from commlayer.codecs.base import Codec, CodecContext, Encoded, as_array, from_buffer, itemsize, validate_config_types
from commlayer.codecs.registry import register_codec


@dataclass(frozen=True)
class LZ4Config:
    """Options of :class:`LZ4`.

    Attributes:
        shuffle: byte-shuffle multi-byte buffers before compressing.
        acceleration: LZ4 fast-mode acceleration (>= 1; higher is faster, compresses less).
    """

    shuffle: bool = True
    acceleration: int = 1

    def __post_init__(self) -> None:
        validate_config_types(self)
        if self.acceleration < 1:
            raise ValueError(f"Expected acceleration >= 1, got {self.acceleration}")


@register_codec
class LZ4(Codec):
    """Lossless; compresses each buffer where it pays."""

    codec_id = "lz4"
    Config = LZ4Config
    kind = "lossless"
    unbiased = True
    fixed_size = False

    def encode_buffers(self, encoded: Encoded) -> Encoded:
        """Compresses the buffers of ``encoded``; header ``{"z": [[raw_len, shuffle_width, packed], ...], "h": inner}``."""
        table: list[list[int]] = []
        out: list[Any] = []
        for b in encoded.buffers:
            raw = np.frombuffer(memoryview(b).cast("B"), dtype=np.uint8)
            width = int(getattr(b, "itemsize", 1)) if self.config.shuffle else 1
            data = raw
            if width > 1 and raw.size % width == 0:
                data = raw.reshape(-1, width).T.copy().reshape(-1)
            else:
                width = 1
            packed = lz4.block.compress(data, mode="fast", acceleration=self.config.acceleration, store_size=False) if raw.size else b""
            if 0 < len(packed) < raw.size:
                table.append([int(raw.size), width, 1])
                out.append(packed)
            else:
                table.append([int(raw.size), 1, 0])
                out.append(b)
        return Encoded({"z": table, "h": encoded.header}, out)

    def decode_buffers(self, encoded: Encoded, bound: int) -> Encoded:
        """Inverse of :meth:`encode_buffers`; ``bound`` caps the total decompressed size."""
        table = encoded.header.get("z") if isinstance(encoded.header, dict) else None
        if not isinstance(table, list) or len(table) != len(encoded.buffers) or "h" not in encoded.header:
            raise ValueError(f"Malformed lz4 payload: expected a table of {len(encoded.buffers)} entries, got {table!r:.100}")
        if sum(int(r[0]) for r in table if isinstance(r, list) and r) > bound:
            raise ValueError(f"Malformed lz4 payload: expected at most {bound} decompressed bytes")
        out = []
        for row, b in zip(table, encoded.buffers):
            if not (isinstance(row, list) and len(row) == 3 and all(isinstance(v, int) and v >= 0 for v in row)):
                raise ValueError(f"Malformed lz4 payload: expected [raw_len, width, packed], got {row!r}")
            raw_len, width, packed = row
            if not packed:
                if memoryview(b).nbytes != raw_len:
                    raise ValueError(f"Malformed lz4 payload: expected {raw_len} stored bytes, got {memoryview(b).nbytes}")
                out.append(b)
                continue
            try:
                data = lz4.block.decompress(memoryview(b).cast("B"), uncompressed_size=raw_len)
            except Exception as exc:
                raise ValueError(f"Malformed lz4 payload: {exc}") from None
            if len(data) != raw_len or width < 1 or raw_len % width:
                raise ValueError(f"Malformed lz4 payload: expected {raw_len} bytes in width {width}, got {len(data)}")
            arr = np.frombuffer(data, dtype=np.uint8)
            out.append(arr.reshape(width, -1).T.copy().reshape(-1) if width > 1 else arr)
        return Encoded(encoded.header["h"], out)

    def encode(self, tensor: torch.Tensor, ctx: CodecContext) -> Encoded:
        return self.encode_buffers(Encoded({}, [as_array(tensor.detach().reshape(-1))]))

    def decode(self, encoded: Encoded, ctx: CodecContext) -> torch.Tensor:
        inner = self.decode_buffers(encoded, self.wire_bytes(ctx.numel, ctx.dtype))
        if len(inner.buffers) != 1:
            raise ValueError(f"Malformed lz4 payload: expected 1 buffer, got {len(inner.buffers)}")
        t = from_buffer(inner.buffers[0], ctx.dtype, ctx.numel, "lz4 values")
        return t.clone().reshape(ctx.shape)

    def wire_bytes(self, numel: int, dtype: torch.dtype) -> int:
        return numel * itemsize(dtype)
