"""Vectorized bit packing (numpy): fixed-width lanes and arbitrary-width unsigned integers.

Bit order is little-endian everywhere: element ``i`` of a ``w``-bit lane array occupies bits
``[i*w, (i+1)*w)`` of the stream, least significant bit first.
"""

from __future__ import annotations

import numpy as np

LANE_WIDTHS = (1, 2, 4, 8, 16)


def packed_nbytes(count: int, width: int) -> int:
    """Bytes taken by ``count`` values of ``width`` bits."""
    return (count * width + 7) // 8


def pack_lanes(values: np.ndarray, width: int) -> np.ndarray:
    """Packs small unsigned ints (``< 2**width``) into bytes; ``width`` in :data:`LANE_WIDTHS`."""
    if width == 16:
        return np.ascontiguousarray(values, dtype="<u2").view(np.uint8)
    v = np.ascontiguousarray(values, dtype=np.uint8).reshape(-1)
    if width == 8:
        return v
    if width == 1:
        return np.packbits(v, bitorder="little")
    per = 8 // width
    pad = (-v.size) % per
    if pad:
        v = np.concatenate([v, np.zeros(pad, np.uint8)])
    v = v.reshape(-1, per)
    out = v[:, 0].copy()
    for j in range(1, per):
        out |= v[:, j] << np.uint8(j * width)
    return out


def unpack_lanes(packed: np.ndarray, width: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_lanes`; returns ``count`` values (uint8, or uint16 for width 16)."""
    p = np.frombuffer(memoryview(packed).cast("B"), dtype=np.uint8)
    if width == 16:
        return p.view("<u2")[:count]
    if width == 8:
        return p[:count]
    if width == 1:
        return np.unpackbits(p, count=count, bitorder="little")
    per = 8 // width
    shifts = (np.arange(per, dtype=np.uint8) * width).astype(np.uint8)
    out = (p[:, None] >> shifts) & np.uint8((1 << width) - 1)
    return out.reshape(-1)[:count]


def lane_width(nvalues: int) -> int:
    """Smallest lane width in :data:`LANE_WIDTHS` able to hold ``nvalues`` distinct values."""
    for w in LANE_WIDTHS:
        if nvalues <= 1 << w:
            return w
    raise ValueError(f"Expected at most {1 << 16} distinct values per lane, got {nvalues}")


def pack_uint(values: np.ndarray, width: int, chunk: int = 1 << 16) -> np.ndarray:
    """Packs unsigned integers (``< 2**width``, ``1 <= width <= 64``) at exactly ``width`` bits each."""
    if not 1 <= width <= 64:
        raise ValueError(f"Expected a width in [1, 64], got {width}")
    v = np.ascontiguousarray(values, dtype="<u4" if width <= 32 else "<u8").reshape(-1)
    nb = v.dtype.itemsize * 8
    parts = []
    for s in range(0, v.size, chunk):  # chunk is a multiple of 8: every part ends on a byte boundary
        bits = np.unpackbits(v[s : s + chunk].view(np.uint8).reshape(-1, nb // 8), axis=1, bitorder="little")
        parts.append(np.packbits(bits[:, :width].reshape(-1), bitorder="little"))
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def unpack_uint(packed: np.ndarray, width: int, count: int, chunk: int = 1 << 16) -> np.ndarray:
    """Inverse of :func:`pack_uint`; returns ``count`` values as int64."""
    if not 1 <= width <= 64:
        raise ValueError(f"Expected a width in [1, 64], got {width}")
    p = np.frombuffer(memoryview(packed).cast("B"), dtype=np.uint8)
    if p.size != packed_nbytes(count, width):
        raise ValueError(f"Malformed payload: expected {packed_nbytes(count, width)} bytes of {width}-bit values, got {p.size}")
    nb = 32 if width <= 32 else 64
    out = np.empty(count, dtype=np.int64)
    for s in range(0, count, chunk):
        n = min(chunk, count - s)
        seg = p[s * width // 8 : (s * width + n * width + 7) // 8]
        bits = np.unpackbits(seg, count=n * width, bitorder="little").reshape(n, width)
        full = np.zeros((n, nb), dtype=np.uint8)
        full[:, :width] = bits
        out[s : s + n] = np.packbits(full, axis=1, bitorder="little").view("<u4" if nb == 32 else "<u8").reshape(-1)
    return out


def lane_table(width: int, values: np.ndarray) -> np.ndarray:
    """Byte -> decoded lanes table for :func:`decode_lanes` (``width`` in 1, 2, 4, 8).

    Args:
        width: lane width in bits.
        values: ``2**width`` decoded values (float32), indexed by lane code.

    Returns:
        A ``(256, 8 // width)`` float32 table.
    """
    per = 8 // width
    codes = (np.arange(256)[:, None] >> (np.arange(per) * width)) & ((1 << width) - 1)
    return np.asarray(values, dtype=np.float32)[codes]


def decode_lanes(packed: np.ndarray, width: int, count: int, table: np.ndarray) -> np.ndarray:
    """Unpacks and maps lanes through ``table`` in one gather (much faster than shifting)."""
    return np.take(table, packed, axis=0).reshape(-1)[:count]
