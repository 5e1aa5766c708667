"""Malformed frames: the decoder lets only WireError out, and a live rank survives a socket full of them.

CI-sized versions of ``benchmarks/reliability.py --fuzz``. The deep-nesting tests guard the fix
of a bug they found (a 1 KB header nested 1000 levels deep raised RecursionError; docs/reliability.md).
"""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from commlayer.testing import reliability as R
from commlayer.transport.errors import WireError
from commlayer.transport.wire import HEADER_FIELDS, WIRE_VERSION, Header, Kind, check_frames, unpack_header

_VALID = [WIRE_VERSION, int(Kind.DATA), "allreduce", "pg0", 3, 1, 0, 0, "float32", [2, 2], [16], None, 0, [-1, 4, "float32", "sum", None]]

# Any msgpack value, nested a few levels (deep nesting has its own test below).
values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=80) | st.binary(max_size=80),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _decode(data: bytes, frames: list[bytes]) -> None:
    try:
        check_frames(unpack_header(data), frames)
    except WireError:
        pass


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.lists(st.binary(max_size=40), max_size=4))
def test_random_bytes_give_only_wire_errors(data: bytes, frames: list[bytes]) -> None:
    _decode(data, frames)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.integers(0, HEADER_FIELDS - 1), values, min_size=1, max_size=5), st.integers(-2, 2),
       st.lists(st.binary(max_size=40), max_size=3))
def test_mutated_valid_headers_give_only_wire_errors(replace: dict, extra: int, frames: list[bytes]) -> None:
    fields = list(_VALID)
    for i, v in replace.items():
        fields[i] = v
    fields = fields[:HEADER_FIELDS + extra] if extra < 0 else fields + [None] * extra
    _decode(msgpack.packb(fields, use_bin_type=True), frames)


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 200), st.integers(1, 8))
def test_bit_flipped_and_truncated_headers_give_only_wire_errors(cut: int, flip: int) -> None:
    hdr = bytearray(Header(Kind.DATA, "allreduce", "pg0", 9, 2, 1, 1, "int64", (3,), (24,), {"k": [1, "x"]}).pack())
    hdr[cut % len(hdr)] ^= flip
    _decode(bytes(hdr[: len(hdr) - cut % 7]), [b"\0" * 24])


def test_seeded_mutator_gives_only_wire_errors() -> None:
    res = R.fuzz_decoder(4000, seed=3, deep=False)
    assert res["escaped"] == 0, res["escaped_types"]
    assert res["rejected"] > 0.9 * res["messages"], res


@pytest.mark.parametrize("field_index", [0, 2, 4, 9, 10])
def test_deeply_nested_field_is_a_wire_error(field_index: int) -> None:
    with pytest.raises(WireError):
        unpack_header(R.deep_header(1000, field_index))


def test_live_rank_survives_malformed_frames() -> None:
    res = R.fuzz_socket(3000, seed=5, deep=False, big_frames=3, raw_conns=20, time_limit=90.0)
    assert (res["crashes"], res["hangs"], res["wrong_results"]) == (0, 0, 0), res
    # Every malformed frame is rejected; a well-formed rogue message may also be refused by the mailbox
    # (e.g. a duplicate key), which counts as a rejection too.
    assert res["rejected"] >= res["expected_rejections"], res
    assert res["rss_after_mb"] - res["rss_before_mb"] < 64, res
    assert res["fds_after"] <= res["fds_before"] + 2, res
    assert res["threads_after"] == res["threads_before"], res


def test_live_rank_survives_deeply_nested_header() -> None:
    res = R.fuzz_socket(40, seed=6, deep=False, big_frames=0, raw_conns=0, time_limit=60.0, deep_every=20)
    assert (res["crashes"], res["hangs"], res["wrong_results"]) == (0, 0, 0), res.get("crash_errors")
