"""Fleet building blocks in one process: the close rule, the outer step, the store ledger, and state transfer
over real CurveZMQ sockets (two servers, one killed mid-transfer, the download resumed from the other)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from commlayer.fleet.config import FleetConfig
from commlayer.fleet.ledger import PART, connect_store, delete_blob, get_blob, put_blob
from commlayer.fleet.policy import Member, Pending, decide
from commlayer.fleet.state import OuterState
from commlayer.fleet.statesync import CHUNK, FetchFailed, Partial, StateServer, fetch_from
from commlayer.testing.ports import free_port

CFG = FleetConfig(period=5, slack=1.5, min_deadline=0.5, max_staleness=2)


def _m(i: int, start: int, tau: float | None = 1.0, live: bool = True) -> Member:
    return Member(i, live, True, start, tau)


def _p(o: int, s: int, base: int) -> Pending:
    return Pending(o, s, base, 10, "d")


def test_round_waits_for_expected_members_then_closes_at_quorum() -> None:
    members = [_m(0, 4), _m(1, 4), _m(2, 4)]
    assert decide(5, members, [_p(0, 0, 4), _p(1, 0, 4)], opened=0.0, now=0.1, cfg=CFG) is None
    dec = decide(5, members, [_p(0, 0, 4), _p(1, 0, 4), _p(2, 0, 4)], opened=0.0, now=0.1, cfg=CFG)
    assert dec is not None and dec.reason == "quorum" and dec.members == (0, 1, 2)


def test_a_member_predicted_beyond_the_deadline_is_not_waited_for() -> None:
    members = [_m(0, 4), _m(1, 4), _m(2, 4), _m(3, 4, tau=5.0)]
    dec = decide(5, members, [_p(0, 0, 4), _p(1, 0, 4), _p(2, 0, 4)], opened=0.0, now=0.1, cfg=CFG)
    assert dec is not None and dec.reason == "quorum" and 3 in dec.members and dec.waited_on == ()


def test_deadline_closes_without_a_silent_member_and_fixed_world_never_does() -> None:
    members = [_m(0, 4), _m(1, 4)]
    pend = [_p(0, 0, 4)]
    assert decide(5, members, pend, opened=0.0, now=1.0, cfg=CFG) is None  # deadline = 1.5 x median tau 1.0
    dec = decide(5, members, pend, opened=0.0, now=1.6, cfg=CFG)
    assert dec is not None and dec.reason == "deadline" and dec.waited_on == (1,)
    fixed = FleetConfig(close="all")
    assert decide(5, members, pend, opened=0.0, now=1e6, cfg=fixed) is None


def test_dead_members_are_not_waited_for_and_stale_contributions_are_dropped_not_lost() -> None:
    members = [_m(0, 4), _m(1, 4, live=False), _m(2, 1)]
    dec = decide(5, members, [_p(0, 0, 4), _p(2, 0, 1)], opened=0.0, now=0.1, cfg=CFG)
    assert dec is not None and dec.members == (0,) and dec.live == (0, 2)
    assert [p.owner for p in dec.dropped] == [2]  # base 1 -> staleness 3 > 2
    late = decide(5, members, [_p(0, 0, 4), _p(2, 0, 2)], opened=0.0, now=0.1, cfg=CFG)
    assert late is not None and {p.owner for p in late.include} == {0, 2} and not late.dropped


def test_outer_step_matches_torch_nesterov_sgd() -> None:
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(100, generator=g)
    st = OuterState.initial(p0)
    ref = p0.clone().requires_grad_(True)
    opt = torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=True)
    for r in range(1, 6):
        agg = torch.randn(100, generator=g)
        st.apply(r, agg, 0.7, 0.9, {})
        ref.grad = agg.clone()
        opt.step()
    assert torch.allclose(st.params, ref.detach(), atol=1e-6)
    with pytest.raises(ValueError, match="Expected round 6 next, got round 8"):
        st.apply(8, None, 1.0, 0.0, {})
    back = OuterState.from_bytes(st.to_bytes(), "test")
    assert back.digest() == st.digest() and back.round == 5


def test_blobs_above_the_store_frame_limit_round_trip_and_a_wrong_digest_is_named() -> None:
    store = connect_store(f"127.0.0.1:{free_port()}", 30.0, master=True)
    data = np.random.default_rng(1).bytes(PART * 2 + 123)
    d = put_blob(store, "x/blob", data)
    assert get_blob(store, "x/blob", d, "blob") == data
    with pytest.raises(ValueError, match="blob: expected digest 00"):
        get_blob(store, "x/blob", "00", "blob")
    delete_blob(store, "x/blob")
    assert not store.check(["x/blob"]) and not store.check(["x/blob/p0"])


def test_state_fetch_resumes_on_another_replica_after_the_first_server_dies() -> None:
    key = b"k" * 32
    st = OuterState.initial(torch.randn(12 * CHUNK // 4 + 1000))  # 24+ chunks: more than one window in flight
    st.round = 7
    a, b = StateServer(1, key), StateServer(2, key)
    try:
        a.publish(st)
        b.publish(OuterState.from_bytes(st.to_bytes(), "copy"))
        partial = Partial()
        n = len(st.to_bytes()) // CHUNK + 1

        def die(i: int) -> None:
            if len(partial.chunks) == 2:
                a.close()

        with pytest.raises(FetchFailed, match="peer 1"):
            fetch_from(a.endpoint, 1, a.public, key, partial, stall=1.0, on_chunk=die)
        got_a = len(partial.chunks)
        assert 2 <= got_a < n
        got = fetch_from(b.endpoint, 2, b.public, key, partial, stall=5.0)
        assert got.digest() == st.digest() and got.round == 7
        assert b.served_chunks == n - got_a  # only the missing chunks came from the second replica
    finally:
        b.close()


def test_state_fetch_resumes_from_disk_and_rejects_a_wrong_server_key(tmp_path) -> None:
    key = b"k" * 32
    st = OuterState.initial(torch.randn(CHUNK // 2))
    srv = StateServer(3, key)
    try:
        srv.publish(st)
        first = Partial(path=str(tmp_path))
        fetch_from(srv.endpoint, 3, srv.public, key, first, stall=5.0)
        served = srv.served_chunks
        again = fetch_from(srv.endpoint, 3, srv.public, key, Partial(path=str(tmp_path)), stall=5.0)
        assert again.digest() == st.digest() and srv.served_chunks == served  # every chunk came from disk
        other = StateServer(4, b"z" * 32)
        t0 = time.monotonic()
        with pytest.raises(FetchFailed, match="no manifest"):  # CURVE handshake fails: nothing is ever answered
            fetch_from(srv.endpoint, 3, other.public, key, Partial(), stall=1.0)
        assert time.monotonic() - t0 < 5
        other.close()
    finally:
        srv.close()
