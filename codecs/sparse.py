"""Shared machinery of the sparsifiers: the (values, indices) payload and compact index codes.

Payload of a sparsifier: header ``{"k": kept}``, ``buffers[0]`` the kept values in the tensor's
dtype, ``buffers[1]`` their indices (ascending) in one of two codes:

* ``index=bits`` (default): each index in exactly ``ceil(log2 numel)`` bits; fixed size.
* ``index=delta``: gaps between consecutive indices as little-endian uint32. Small gaps leave the
  high bytes zero, so a following ``lz4`` stage (byte-shuffled) shrinks them well below ``bits``.

In a pipeline, a dense stage after a sparsifier (``topk|int8``) encodes ``buffers[0]``.
"""

from __future__ import annotations

import abc
import math
from typing import ClassVar

import numpy as np
import torch

from commlayer.codecs.base import Codec, CodecContext, Encoded, as_array, check_header, from_buffer, itemsize
from commlayer.codecs.bitpack import pack_uint, packed_nbytes, unpack_uint

INDEX_MODES = ("bits", "delta")


def index_width(numel: int) -> int:
    """Bits per index in the ``bits`` code."""
    return max(1, (numel - 1).bit_length())


def index_nbytes(k: int, numel: int, mode: str) -> int:
    """Bytes taken by ``k`` indices into a tensor of ``numel`` elements."""
    return packed_nbytes(k, index_width(numel)) if mode == "bits" else 4 * k


def pack_indices(idx: np.ndarray, numel: int, mode: str) -> np.ndarray:
    """Encodes ascending int64 indices."""
    if mode == "bits":
        return pack_uint(idx, index_width(numel))
    if numel > 1 << 32:
        raise ValueError(f"Expected at most 2**32 elements for index=delta, got {numel}")
    return np.diff(idx, prepend=0).astype("<u4")


def unpack_indices(buf: object, k: int, numel: int, mode: str) -> torch.Tensor:
    """Decodes and validates ``k`` ascending indices (ValueError on malformed input)."""
    raw = np.frombuffer(memoryview(buf).cast("B"), dtype=np.uint8)
    if raw.size != index_nbytes(k, numel, mode):
        raise ValueError(f"Malformed payload: expected {index_nbytes(k, numel, mode)} bytes of indices, got {raw.size}")
    if mode == "bits":
        idx = unpack_uint(raw, index_width(numel), k)
        ok = k == 0 or (bool(np.all(np.diff(idx) > 0)) and idx[-1] < numel)
    else:
        gaps = raw.view("<u4").astype(np.int64)
        idx = np.cumsum(gaps)
        ok = k == 0 or (bool(np.all(gaps[1:] > 0)) and idx[-1] < numel)
    if not ok:
        raise ValueError(f"Malformed payload: expected {k} strictly ascending indices below {numel}")
    return torch.from_numpy(idx)


def ratio_k(ratio: float, numel: int) -> int:
    """``ceil(ratio * numel)`` clipped to [1, numel] (0 for an empty tensor)."""
    if numel == 0:
        return 0
    return min(numel, max(1, math.ceil(ratio * numel - 1e-9)))


class SparseCodec(Codec):
    """Base of the sparsifiers; subclasses implement :meth:`select` and :meth:`max_kept`."""

    kind: ClassVar[str] = "sparse"
    n_buffers: ClassVar[int] = 2

    @abc.abstractmethod
    def select(self, flat: torch.Tensor, ctx: CodecContext) -> torch.Tensor:
        """Ascending int64 indices of the elements to send."""

    @abc.abstractmethod
    def max_kept(self, numel: int) -> int:
        """Most elements kept from a tensor of ``numel`` elements."""

    @property
    def index_mode(self) -> str:
        return getattr(self.config, "index", "bits")

    def encode(self, tensor: torch.Tensor, ctx: CodecContext) -> Encoded:
        flat = tensor.detach().reshape(-1)
        idx = self.select(flat, ctx)
        return Encoded({"k": int(idx.numel())}, [as_array(flat[idx]), pack_indices(idx.numpy(), flat.numel(), self.index_mode)])

    def kept(self, header: dict, numel: int) -> int:
        """Validated number of values in a payload."""
        k = check_header(header, "k", int, self.codec_id)
        if not 0 <= k <= self.max_kept(numel):
            raise ValueError(f"Malformed {self.codec_id} payload: expected k in [0, {self.max_kept(numel)}], got {k}")
        return k

    def sparse_parts(self, encoded: Encoded, ctx: CodecContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated ``(indices, values)`` of a payload (indices strictly ascending)."""
        if len(encoded.buffers) != self.n_buffers:
            raise ValueError(f"Malformed {self.codec_id} payload: expected {self.n_buffers} buffers, got {len(encoded.buffers)}")
        n = ctx.numel
        k = self.kept(encoded.header, n)
        values = from_buffer(encoded.buffers[0], ctx.dtype, k, f"{self.codec_id} values")
        return unpack_indices(encoded.buffers[1], k, n, self.index_mode), values

    def decode(self, encoded: Encoded, ctx: CodecContext) -> torch.Tensor:
        idx, values = self.sparse_parts(encoded, ctx)
        out = torch.zeros(ctx.numel, dtype=ctx.dtype)
        out[idx] = values
        return out.reshape(ctx.shape)

    def wire_bytes(self, numel: int, dtype: torch.dtype) -> int:
        k = self.max_kept(numel)
        return k * itemsize(dtype) + (index_nbytes(k, numel, self.index_mode) if self.n_buffers == 2 else 0)

    def other_bytes(self, numel: int) -> int:
        """Payload bytes other than the values (the indices), at most."""
        k = self.max_kept(numel)
        return index_nbytes(k, numel, self.index_mode) if self.n_buffers == 2 else 0


def check_index_mode(mode: str) -> None:
    if mode not in INDEX_MODES:
        raise ValueError(f"Expected index in {INDEX_MODES}, got {mode!r}")
