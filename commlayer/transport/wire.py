"""Wire format: an envelope frame (set by ZeroMQ), a msgpack header and raw payload frames.

The header is a msgpack array, validated field by field on receipt. Payload frames are raw
bytes; the transport checks only that their count and sizes match the header and never
interprets them (no pickle anywhere).
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Sequence

import msgpack

from commlayer.transport.errors import WireError

WIRE_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
MAX_FRAMES = 1024
MAX_META_ITEMS = 64

# Element types allowed on the wire, with their size in bytes ("" = opaque bytes).
DTYPE_SIZES: dict[str, int] = {
    "": 1,
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "complex64": 8,
    "complex128": 16,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
}


class Kind(IntEnum):
    """What a message is for. Only DATA carries operation payloads."""

    DATA = 0
    HELLO = 1
    BYE = 2
    PING = 3
    PONG = 4


@dataclass(frozen=True, slots=True)
class Header:
    """Metadata frame of every message.

    Attributes:
        kind: message kind.
        op: operation name ("allreduce", "send", ...), used to detect mismatched collectives.
        channel: stream the message belongs to (a process group, a topology instance, p2p).
        seq: operation sequence number within the channel (for p2p: the tag).
        step: algorithm step within the operation.
        chunk: chunk index within the step.
        src: sender's global rank.
        dtype: element type of the payload ("" for opaque bytes).
        shape: shape of the payload tensor (empty for opaque or scalar payloads).
        nbytes: length of each payload frame.
        meta: small extra fields (e.g. a codec header); ints, floats, strings, bytes, lists.
    """

    kind: Kind
    op: str
    channel: str
    seq: int
    step: int
    chunk: int
    src: int
    dtype: str = ""
    shape: tuple[int, ...] = ()
    nbytes: tuple[int, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    def pack(self) -> bytes:
        return msgpack.packb(
            [WIRE_VERSION, int(self.kind), self.op, self.channel, self.seq, self.step, self.chunk,
             self.src, self.dtype, list(self.shape), list(self.nbytes), self.meta or None],
            use_bin_type=True,
        )


_UNPACK_LIMITS = dict(
    max_str_len=4096,
    max_bin_len=16 * 1024,
    max_array_len=MAX_FRAMES,
    max_map_len=MAX_META_ITEMS,
    max_ext_len=0,
)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist = 2, 60, 60, 8


def _expect(cond: bool, what: str, got: Any) -> None:
    if not cond:  # bounded repr: hostile values may be huge or nested 1000 levels deep
        raise WireError(f"malformed header: expected {what}, got {_REPR.repr(got)}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def unpack_header(data: bytes | memoryview) -> Header:
    """Parses and validates a header frame.

    Raises:
        WireError: if the frame is not a valid commlayer header of this wire version (and nothing else).
    """
    try:
        return _unpack_header(data)
    except WireError:
        raise
    except (RecursionError, ValueError, TypeError, OverflowError, MemoryError) as exc:
        raise WireError(f"malformed header: {type(exc).__name__}") from None


def _unpack_header(data: bytes | memoryview) -> Header:
    if len(data) > MAX_HEADER_BYTES:
        raise WireError(f"malformed header: expected at most {MAX_HEADER_BYTES} bytes, got {len(data)}")
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True, **_UNPACK_LIMITS)
    except Exception as exc:  # msgpack raises several types for bad input
        raise WireError(f"malformed header: not valid msgpack ({type(exc).__name__}: {exc})") from None
    _expect(isinstance(raw, list) and len(raw) == 12, "a 12-field array", type(raw).__name__ if not isinstance(raw, list) else f"{len(raw)} fields")
    ver, kind, op, channel, seq, step, chunk, src, dtype, shape, nbytes, meta = raw
    _expect(ver == WIRE_VERSION, f"wire version {WIRE_VERSION} (peers must run the same commlayer release)", ver)
    _expect(_is_int(kind) and kind in Kind._value2member_map_, "a message kind", kind)
    _expect(isinstance(op, str) and len(op) <= 64, "an op name", op)
    _expect(isinstance(channel, str) and len(channel) <= 256, "a channel name", channel)
    for name, v in (("seq", seq), ("step", step), ("chunk", chunk), ("src", src)):
        _expect(_is_int(v) and -(2**62) <= v < 2**62, f"an integer {name}", v)
    _expect(src >= 0, "a non-negative src", src)
    _expect(isinstance(dtype, str) and dtype in DTYPE_SIZES, f"a dtype in {sorted(DTYPE_SIZES)}", dtype)
    _expect(isinstance(shape, list) and len(shape) <= 32 and all(_is_int(d) and d >= 0 for d in shape), "a shape", shape)
    _expect(isinstance(nbytes, list) and all(_is_int(n) and 0 <= n < 2**48 for n in nbytes), "a list of frame sizes", nbytes)
    _expect(meta is None or isinstance(meta, dict), "a meta map or nil", type(meta).__name__)
    if dtype and shape:
        _expect(math.prod(shape) * DTYPE_SIZES[dtype] == sum(nbytes), f"payload of {math.prod(shape)} x {dtype}", f"{sum(nbytes)} bytes")
    return Header(Kind(kind), op, channel, seq, step, chunk, src, dtype, tuple(shape), tuple(nbytes), meta or {})


def check_frames(header: Header, frames: Sequence[Any]) -> None:
    """Checks the payload frames against the header's declared sizes."""
    if len(frames) != len(header.nbytes):
        raise WireError(f"malformed message from rank {header.src}: header declares {len(header.nbytes)} payload frames, got {len(frames)}")
    for i, (f, n) in enumerate(zip(frames, header.nbytes)):
        size = len(f)
        if size != n:
            raise WireError(f"malformed message from rank {header.src}: payload frame {i} declared {n} bytes, got {size}")
