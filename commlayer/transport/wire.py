"""Wire format: an envelope frame (set by ZeroMQ), a msgpack header and raw payload frames.

The header is a msgpack array, validated field by field on receipt. Payload frames are raw
bytes; the transport checks only that their count and sizes match the header and never
interprets them (no pickle anywhere). A payload frame larger than the per-frame cap travels as
several ZeroMQ frames (see :func:`split_frames`), so no receiver ever allocates more than the cap
for a single frame before it knows the sender.

Headers are built by the constructors in :mod:`commlayer.transport.envelope`, never positionally.
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Any, Sequence

import msgpack

from commlayer.transport.errors import WireError

WIRE_VERSION = 2
HEADER_FIELDS = 14
PART_BYTES = 8 << 20  # payload frames travel in wire parts of at most this many bytes (protocol constant)
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
    P2P = 5  # tagged point-to-point data, matched in order per (channel, tag)
    ABORT = 6  # a peer found this channel's collectives mismatched: every rank fails the channel


@dataclass(frozen=True, slots=True)
class Call:
    """Fingerprint of a collective call, carried by each of its messages and compared by receivers.

    Attributes:
        root: group rank of the root (-1 for unrooted collectives).
        count: total number of elements of the call (-1 when not applicable, e.g. barrier).
        dtype: element type of the call's tensors ("" when not applicable).
        redop: reduction operator name ("" for collectives without one).
        shapes: shapes of every tensor of the call (debug mode only, else None).
    """

    root: int = -1
    count: int = -1
    dtype: str = ""
    redop: str = ""
    shapes: tuple[tuple[int, ...], ...] | None = None

    def describe(self, op: str) -> str:
        parts = [] if self.root < 0 else [f"root={self.root}"]
        if self.count >= 0:
            parts.append(f"{self.count} x {self.dtype or 'bytes'}")
        if self.redop:
            parts.append(f"op={self.redop}")
        if self.shapes is not None:
            parts.append("shapes=" + ",".join(str(list(s)) for s in self.shapes))
        return f"{op}({', '.join(parts)})"

    def differs(self, other: "Call") -> bool:
        """True when the calls disagree (shapes compared only when both sides recorded them)."""
        if (self.root, self.count, self.dtype, self.redop) != (other.root, other.count, other.dtype, other.redop):
            return True
        return self.shapes is not None and other.shapes is not None and self.shapes != other.shapes

    def pack(self) -> list[Any]:
        return [self.root, self.count, self.dtype, self.redop, None if self.shapes is None else [list(x) for x in self.shapes]]


@dataclass(frozen=True, slots=True)
class Header:
    """Metadata frame of every message.

    Attributes:
        kind: message kind.
        op: operation name ("allreduce", "send", ...), used to detect mismatched collectives.
        channel: stream the message belongs to (a process group, a topology instance, p2p).
        seq: operation sequence number within the channel (0 for p2p).
        step: algorithm step within the operation.
        chunk: chunk (or shard) index within the step.
        src: sender's global rank.
        dtype: element type of the payload ("" for opaque bytes).
        shape: shape of the payload tensor (empty for opaque or scalar payloads).
        nbytes: length of each payload frame.
        meta: small extra fields (e.g. a codec header); ints, floats, strings, bytes, lists.
        tag: the tag of a P2P message (0 otherwise).
        call: the fingerprint of the collective call a DATA message belongs to (None otherwise).
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
    tag: int = 0
    call: Call | None = None

    def pack(self) -> bytes:
        return msgpack.packb(
            [WIRE_VERSION, int(self.kind), self.op, self.channel, self.seq, self.step, self.chunk,
             self.src, self.dtype, list(self.shape), list(self.nbytes), self.meta or None, self.tag,
             None if self.call is None else self.call.pack()],
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
    _expect(isinstance(raw, list) and len(raw) in (12, HEADER_FIELDS), f"a {HEADER_FIELDS}-field array",
            type(raw).__name__ if not isinstance(raw, list) else f"{len(raw)} fields")
    _expect(raw[0] == WIRE_VERSION, f"wire version {WIRE_VERSION} (peers must run the same commlayer release)", raw[0])
    _expect(len(raw) == HEADER_FIELDS, f"a {HEADER_FIELDS}-field array", f"{len(raw)} fields")
    ver, kind, op, channel, seq, step, chunk, src, dtype, shape, nbytes, meta, tag, call = raw
    _expect(_is_int(kind) and kind in Kind._value2member_map_, "a message kind", kind)
    _expect(isinstance(op, str) and len(op) <= 64, "an op name", op)
    _expect(isinstance(channel, str) and len(channel) <= 256, "a channel name", channel)
    for name, v in (("seq", seq), ("step", step), ("chunk", chunk), ("src", src), ("tag", tag)):
        _expect(_is_int(v) and -(2**62) <= v < 2**62, f"an integer {name}", v)
    _expect(src >= 0, "a non-negative src", src)
    _expect(isinstance(dtype, str) and dtype in DTYPE_SIZES, f"a dtype in {sorted(DTYPE_SIZES)}", dtype)
    _expect(isinstance(shape, list) and len(shape) <= 32 and all(_is_int(d) and d >= 0 for d in shape), "a shape", shape)
    _expect(isinstance(nbytes, list) and all(_is_int(n) and 0 <= n < 2**48 for n in nbytes), "a list of frame sizes", nbytes)
    _expect(meta is None or isinstance(meta, dict), "a meta map or nil", type(meta).__name__)
    if dtype and shape:
        _expect(math.prod(shape) * DTYPE_SIZES[dtype] == sum(nbytes), f"payload of {math.prod(shape)} x {dtype}", f"{sum(nbytes)} bytes")
    return Header(Kind(kind), op, channel, seq, step, chunk, src, dtype, tuple(shape), tuple(nbytes), meta or {}, tag,
                  _unpack_call(call))


def _unpack_call(raw: Any) -> Call | None:
    if raw is None:
        return None
    _expect(isinstance(raw, list) and len(raw) == 5, "a 5-field call fingerprint or nil", raw)
    root, count, dtype, redop, shapes = raw
    _expect(_is_int(root) and -1 <= root < 2**31, "an integer root", root)
    _expect(_is_int(count) and -1 <= count < 2**62, "an integer count", count)
    _expect(isinstance(dtype, str) and dtype in DTYPE_SIZES, "a call dtype", dtype)
    _expect(isinstance(redop, str) and len(redop) <= 32, "a reduce-op name", redop)
    if shapes is not None:
        _expect(isinstance(shapes, list) and len(shapes) <= MAX_META_ITEMS and all(
            isinstance(x, list) and len(x) <= 32 and all(_is_int(d) and d >= 0 for d in x) for x in shapes), "a list of shapes", shapes)
        shapes = tuple(tuple(x) for x in shapes)
    return Call(root, count, dtype, redop, shapes)


def with_sizes(header: Header, frames: Sequence[Any]) -> Header:
    """``header`` with the byte length of each payload frame filled in."""
    return replace(header, nbytes=tuple(f.nbytes if isinstance(f, memoryview) else len(f) if isinstance(f, (bytes, bytearray))
                                        else memoryview(f).nbytes for f in frames))


def split_frames(frames: Sequence[Any], cap: int) -> list[Any]:
    """The wire frames of ``frames``: each payload longer than ``cap`` bytes cut into parts of ``cap``
    bytes (views, no copy). An empty payload stays one empty frame."""
    out: list[Any] = []
    for f in frames:
        n = len(f) if isinstance(f, (bytes, bytearray)) else memoryview(f).nbytes
        if n <= cap:
            out.append(f)
            continue
        v = memoryview(f).cast("B")
        out.extend(v[i:i + cap] for i in range(0, n, cap))
    return out


def join_frames(header: Header, parts: Sequence[Any], cap: int) -> list[Any]:
    """Reassembles the payload frames the header declares from wire ``parts`` (inverse of :func:`split_frames`).

    Raises:
        WireError: a part is larger than ``cap`` or the parts do not add up to the declared sizes.
    """
    if len(parts) == len(header.nbytes):
        return list(parts)  # nothing was split (the common case); check_frames checks the sizes
    out: list[Any] = []
    i = 0
    for n in header.nbytes:
        if n <= cap:
            if i >= len(parts):
                break
            out.append(parts[i])
            i += 1
            continue
        k = -(-n // cap)
        group = parts[i:i + k]
        if len(group) != k or any(len(g) != cap for g in group[:-1]) or sum(len(g) for g in group) != n:
            raise WireError(f"malformed message from rank {header.src}: a {n}-byte payload must arrive as {k} parts of "
                            f"{cap} bytes, got parts of {[len(g) for g in group][:8]} bytes")
        joined = bytearray(n)  # writable, one copy
        view, at = memoryview(joined), 0
        for g in group:
            view[at:at + len(g)] = g
            at += len(g)
        out.append(joined)
        i += k
    if i != len(parts):
        raise WireError(f"malformed message from rank {header.src}: header declares {len(header.nbytes)} payload frames, "
                        f"got {len(parts)} wire frames")
    return out


def check_frames(header: Header, frames: Sequence[Any]) -> None:
    """Checks the payload frames against the header's declared sizes."""
    if len(frames) != len(header.nbytes):
        raise WireError(f"malformed message from rank {header.src}: header declares {len(header.nbytes)} payload frames, got {len(frames)}")
    for i, (f, n) in enumerate(zip(frames, header.nbytes)):
        size = len(f)
        if size != n:
            raise WireError(f"malformed message from rank {header.src}: payload frame {i} declared {n} bytes, got {size}")
