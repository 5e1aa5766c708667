"""Malformed frames: mutations of valid messages, fed to the wire decoder (in this process)."""

from __future__ import annotations

import math
import os
import random
import time
from typing import Any

import msgpack

from commlayer.transport.errors import WireError
from commlayer.transport.wire import DTYPE_SIZES, MAX_HEADER_BYTES, Header, Kind, check_frames, unpack_header

_VALID_DTYPES = [d for d in DTYPE_SIZES if d]


def valid_message(rng: random.Random, src: int = 0, channel: str = "pg0") -> list[bytes]:
    """A well-formed message (header + payload frames) as a rank would send it."""
    kind = rng.choice(list(Kind))
    dtype = rng.choice(_VALID_DTYPES + [""])
    if dtype and rng.random() < 0.7:
        shape = [rng.randint(0, 6) for _ in range(rng.randint(1, 3))]
        total = math.prod(shape) * DTYPE_SIZES[dtype]
        cut = rng.randint(0, total)
        sizes = [cut, total - cut] if rng.random() < 0.3 else [total]
    else:
        shape, sizes = [], [rng.randint(0, 64) for _ in range(rng.randint(0, 3))]
    meta = rng.choice([None, {"world_size": 2, "nonce": "abc"}, {"codec": b"\x00\x01", "k": [1, 2.5, "x"]}])
    h = Header(kind, rng.choice(["allreduce", "broadcast", "p2p", "hello", "x" * 64]), channel, rng.randint(0, 2**40),
               rng.randint(0, 100), rng.randint(0, 100), src, dtype, tuple(shape), tuple(sizes), meta or {})
    return [h.pack()] + [bytes(rng.getrandbits(8) for _ in range(n)) if n < 64 else os.urandom(n) for n in sizes]


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if r < 0.15:
        return rng.choice([0, 1, -1, 2**31, -(2**31), 2**62, -(2**62), 2**63 - 1, -(2**63), 2**64 - 1, 2**48])
    if r < 0.25:
        return rng.choice([float("nan"), float("inf"), -0.0, 1e308, 3.5])
    if r < 0.35:
        return rng.choice([None, True, False])
    if r < 0.5:
        return "".join(chr(rng.randint(0, 0x2FF)) for _ in range(rng.choice([0, 1, 8, 65, 257, 4096])))
    if r < 0.6:
        return os.urandom(rng.choice([0, 1, 16, 1000]))
    if r < 0.8 and depth < 3:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    if depth < 3:
        return {rng.choice(["a", "world_size", "", "nonce"]) + str(i): _random_value(rng, depth + 1) for i in range(rng.randint(0, 4))}
    return rng.randint(-5, 5)


def _nested(depth: int, leaf: bytes = b"\x00") -> bytes:
    return b"\x91" * depth + leaf  # fixarray of one element, ``depth`` times


DEEP_DEPTHS = (990, 1000, 1010, 1022, 1023)  # msgpack accepts them; repr() of such a value overflows the C stack guard


def mutate_header(rng: random.Random, hdr: bytes, deep: bool = True) -> bytes:
    """One malformed header frame derived from a valid one (or from nothing)."""
    fields = msgpack.unpackb(hdr, raw=False)
    k = rng.randrange(12)
    if k == 0:  # bit flips
        b = bytearray(hdr)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if k == 1:  # truncation
        return hdr[:rng.randrange(len(hdr))]
    if k == 2:  # trailing garbage
        return hdr + os.urandom(rng.randint(1, 16))
    if k == 3:  # random bytes, sometimes over the size limit
        return os.urandom(rng.choice([0, 1, 2, 13, 100, 1000, MAX_HEADER_BYTES + 1]))
    if k == 4:  # one field replaced by a value of another type or range
        i = rng.randrange(12)
        fields[i] = _random_value(rng)
        return msgpack.packb(fields, use_bin_type=rng.random() < 0.8)
    if k == 5:  # several fields replaced
        for i in rng.sample(range(12), rng.randint(2, 6)):
            fields[i] = _random_value(rng)
        return msgpack.packb(fields, use_bin_type=True)
    if k == 6:  # wrong field count
        return msgpack.packb(fields[:rng.randrange(12)] if rng.random() < 0.5 else fields + [_random_value(rng)])
    if k == 7:  # lengths that promise more than the frame holds (array32/map32/str32/bin32)
        return rng.choice([b"\xdd", b"\xdf", b"\xdb", b"\xc6", b"\xdc", b"\xde"]) + rng.choice(
            [b"\xff\xff\xff\xff", b"\x00\x01\x00\x00", b"\xff\xff"]) + os.urandom(rng.randint(0, 8))
    if k == 8:  # deep nesting in one field (msgpack allows 1023 levels; repr recursion does not)
        i = rng.choice([0, 1, 2, 3, 4, 8, 9, 10, 11])
        parts = [msgpack.packb(f, use_bin_type=True) for f in fields]
        parts[i] = _nested(rng.choice([10, 500, 900, 1024, 1100, 3000] + (list(DEEP_DEPTHS) if deep else [])))
        return b"\x9c" + b"".join(parts)
    if k == 9:  # a non-array top level
        return msgpack.packb(_random_value(rng), use_bin_type=True)
    if k == 10:  # consistent-looking but oversized declared payloads
        fields[10] = [rng.choice([2**47, 2**48 - 1, 2**48, 10**12])] * rng.randint(1, 3)
        fields[8], fields[9] = "", []
        return msgpack.packb(fields, use_bin_type=True)
    # shapes whose product overflows 64 bits, or disagrees with the frame sizes
    fields[8] = rng.choice(_VALID_DTYPES)
    fields[9] = [rng.choice([0, 1, 7, 2**31, 2**62 - 1]) for _ in range(rng.randint(1, 33))]
    return msgpack.packb(fields, use_bin_type=True)


def deep_header(depth: int = 1000, field_index: int = 4) -> bytes:
    """A ~1 KB header whose field ``field_index`` is an array nested ``depth`` levels deep."""
    fields = [1, 0, "allreduce", "pg0", 1, 0, 0, 0, "", [], [], None]
    parts = [msgpack.packb(f) for f in fields]
    parts[field_index] = _nested(depth)
    return b"\x9c" + b"".join(parts)


def fuzz_message(rng: random.Random, src: int = 0, deep: bool = True) -> list[bytes]:
    """A malformed message: a mutated header, or a valid header with wrong payload frames.

    ``deep=False`` leaves out the headers nested 990-1023 levels deep (see :data:`DEEP_DEPTHS`).
    """
    msg = valid_message(rng, src)
    u = rng.random()
    if u < 0.75:
        return [mutate_header(rng, msg[0], deep)] + msg[1:]
    if u < 0.85:  # payload frame missing or extra
        return msg[:-1] if len(msg) > 1 and rng.random() < 0.5 else msg + [os.urandom(rng.randint(0, 32))]
    if u < 0.95 and len(msg) > 1:  # one payload frame too short or too long
        i = rng.randrange(1, len(msg))
        msg[i] = msg[i][:-1] if msg[i] and rng.random() < 0.5 else msg[i] + b"\x00" * rng.randint(1, 9)
        return msg
    return [os.urandom(rng.randint(0, 40)) for _ in range(rng.randint(1, 6))]  # multipart garbage


def fuzz_decoder(n: int, seed: int, deep: bool = True, time_limit: float = 600.0) -> dict:
    """Feeds ``n`` malformed messages to ``unpack_header`` + ``check_frames`` in this process.

    Only :class:`WireError` may escape. A message that happens to be valid (a mutation can be a
    no-op) counts as accepted. Returns counts, the slowest call and one example per escaping type.
    """
    rng = random.Random(seed)
    counts = {"rejected": 0, "accepted": 0, "escaped": 0}
    escaped: dict[str, str] = {}
    slowest = 0.0
    t_end = time.monotonic() + time_limit
    done = 0
    for done in range(1, n + 1):
        frames = fuzz_message(rng, deep=deep)
        hdr = frames[0]
        data = memoryview(hdr) if rng.random() < 0.5 else hdr
        t0 = time.perf_counter()
        try:
            h = unpack_header(data)
            check_frames(h, frames[1:])
            counts["accepted"] += 1
        except WireError:
            counts["rejected"] += 1
        except BaseException as exc:  # the finding: anything else would escape the transport's handler
            counts["escaped"] += 1
            escaped.setdefault(type(exc).__name__, f"{str(exc)[:120]} (header {hdr[:40]!r}..., {len(hdr)} bytes)")
        slowest = max(slowest, time.perf_counter() - t0)
        if time.monotonic() > t_end:
            break
    return {"messages": done, **counts, "escaped_types": escaped, "slowest_call_ms": round(slowest * 1e3, 3)}
