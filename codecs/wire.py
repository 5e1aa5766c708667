"""Serialization of :class:`Encoded` for topologies and transports (msgpack header + raw frames).

Frame layout: ``frames[0]`` is a msgpack map ``{"v": WIRE_VERSION, "h": header, "n": [len, ...]}``;
``frames[1:]`` are the buffers, sent as they are (zero copy). :func:`pack` / :func:`unpack`
concatenate everything into one blob (``uint32`` header length, header, buffers) for channels
that carry a single message. Never pickle: every field is validated on the way in.
"""

from __future__ import annotations

import struct
from typing import Any, Sequence

import msgpack

from commlayer.codecs.base import Encoded

WIRE_VERSION = 1
#: Largest accepted header (headers are small by contract).
MAX_HEADER_BYTES = 1 << 20


def to_frames(encoded: Encoded) -> tuple[bytes, list[Any]]:
    """Returns ``(header_bytes, buffers)``; the buffers are not copied.

    Raises:
        TypeError: if the header holds something msgpack cannot serialize.
    """
    lengths = [memoryview(b).nbytes for b in encoded.buffers]
    header = msgpack.packb({"v": WIRE_VERSION, "h": encoded.header, "n": lengths}, use_bin_type=True)
    return header, [memoryview(b).cast("B") for b in encoded.buffers]


def from_frames(header_bytes: bytes | memoryview, buffers: Sequence[Any]) -> Encoded:
    """Inverse of :func:`to_frames`.

    Raises:
        ValueError: malformed header, wrong version, or buffer count/lengths that disagree with it.
    """
    hb = memoryview(header_bytes).cast("B")
    if hb.nbytes > MAX_HEADER_BYTES:
        raise ValueError(f"Malformed payload: expected a header of at most {MAX_HEADER_BYTES} bytes, got {hb.nbytes}")
    try:
        meta = msgpack.unpackb(hb, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types
        raise ValueError(f"Malformed payload: header is not valid msgpack ({exc})") from None
    if not isinstance(meta, dict) or set(meta) != {"v", "h", "n"}:
        raise ValueError(f"Malformed payload: expected header keys ['h', 'n', 'v'], got {meta!r:.200}")
    if meta["v"] != WIRE_VERSION:
        raise ValueError(f"Unsupported wire version: expected {WIRE_VERSION}, got {meta['v']!r}")
    lengths = meta["n"]
    if not isinstance(meta["h"], dict) or not isinstance(lengths, list) or not all(isinstance(n, int) and n >= 0 for n in lengths):
        raise ValueError(f"Malformed payload: expected a dict header and a list of lengths, got {meta!r:.200}")
    if len(lengths) != len(buffers):
        raise ValueError(f"Malformed payload: expected {len(lengths)} buffers, got {len(buffers)}")
    for i, (n, b) in enumerate(zip(lengths, buffers)):
        got = memoryview(b).nbytes
        if got != n:
            raise ValueError(f"Malformed payload: expected {n} bytes in buffer {i}, got {got}")
    return Encoded(meta["h"], list(buffers))


def pack(encoded: Encoded) -> bytes:
    """One contiguous blob: ``<u32 header length><header><buffer 0><buffer 1>...``."""
    header, buffers = to_frames(encoded)
    return b"".join([struct.pack("<I", len(header)), header, *[memoryview(b).cast("B") for b in buffers]])


def unpack(blob: bytes | bytearray | memoryview) -> Encoded:
    """Inverse of :func:`pack`; buffers are zero-copy slices of ``blob``.

    Raises:
        ValueError: on a truncated or malformed blob.
    """
    mv = memoryview(blob).cast("B")
    if mv.nbytes < 4:
        raise ValueError(f"Malformed payload: expected at least 4 bytes, got {mv.nbytes}")
    (hlen,) = struct.unpack_from("<I", mv, 0)
    if 4 + hlen > mv.nbytes:
        raise ValueError(f"Malformed payload: header of {hlen} bytes exceeds the {mv.nbytes}-byte blob")
    header = mv[4 : 4 + hlen]
    try:
        lengths = msgpack.unpackb(header, raw=False, strict_map_key=True)["n"]
        total = sum(int(n) for n in lengths)
    except Exception as exc:
        raise ValueError(f"Malformed payload: header is not valid ({exc})") from None
    if 4 + hlen + total != mv.nbytes:
        raise ValueError(f"Malformed payload: expected {4 + hlen + total} bytes, got {mv.nbytes}")
    bufs, off = [], 4 + hlen
    for n in lengths:
        bufs.append(mv[off : off + n])
        off += n
    return from_frames(header, bufs)
