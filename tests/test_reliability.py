"""Kill injection, soak and timeouts: CI-sized versions of ``benchmarks/reliability.py`` (runs in ``commlayer.testing.reliability``).

Real processes (from a forkserver that has imported torch) over real loopback sockets. The
the bugs these tests found (docs/reliability.md) are fixed; the tests guard the fixes.
"""

from __future__ import annotations

import pytest

from commlayer.testing import reliability as R

HEARTBEAT = 1.0  # seconds; the kill runs' detection bound is 2x this (plus slack for a frozen peer)


@pytest.mark.parametrize("run,modes,worlds", [
    (0, ("exit",), (3,)), (1, ("sigkill",), (4,)), (2, ("sigstop",), (3,)),
    (3, ("exit",), (4,)), (4, ("sigkill",), (3,)), (5, ("sigstop",), (4,)),
])
def test_killed_rank_fails_every_survivor_cleanly(run: int, modes: tuple[str, ...], worlds: tuple[int, ...]) -> None:
    """A rank dies (os._exit, SIGKILL) or freezes (SIGSTOP) at a random moment of random collectives:
    every survivor raises a CommError naming it within the bound, shuts down without leftover
    threads or descriptors, and exits."""
    r = R.kill_once(run, seed=11, heartbeat=HEARTBEAT, max_elems=1 << 16, modes=modes, worlds=worlds)
    # r.misnamed (a survivor blaming another survivor that shut down first) is a known race,
    # measured by the benchmark and described in docs/reliability.md; everything else is required.
    assert not r.problems, "\n".join(r.problems)
    bound = 2 * HEARTBEAT + (R.DETECT_SLACK if r.mode == "sigstop" else 0.0)
    assert r.detect_s <= bound, r


def test_soak_random_collectives_match_reference() -> None:
    res = R.run_soak(500, seed=2, world=3, max_elems=60_000, time_limit=100.0)
    assert (res["crashes"], res["hangs"]) == (0, 0), res.get("crash_errors")
    assert res["ops"] == 500
    assert res["mismatches"] == 0, res["first_mismatches"]
    assert res["threads_left"] == []
    for before, after in res["threads_before_after"]:
        assert after == before, res
    # While the group lives, the only new fds are shared-memory rings made on a peer's first large payload
    # (one out and one in per peer: bounded). That nothing is left after destroy_process_group is checked by
    # test_backend_failures.py::test_destroy_closes_sockets_and_threads over repeated init/destroy cycles.
    for before, after in res["fds_before_after"]:
        assert after <= before + 2 * (3 - 1), res
    # Nothing of the group's own operations is left behind (the adaptive controller's channel is
    # reported in docs/reliability.md).
    assert all(m["waiters"] == 0 and "pg0" not in m["left_by_channel"] for m in res["mailbox_after"]), res["mailbox_after"]


@pytest.fixture(scope="module")
def timeouts() -> dict:
    return R.run_timeouts(t=1.0, world=3, margin=2.0)


_GROUP_KINDS = [k for k in R.TIMEOUT_KINDS if k not in R.PER_CALL_KINDS and k != "recv"] + ["barrier_per_call"]


@pytest.mark.parametrize("kind", _GROUP_KINDS)
def test_collective_times_out_when_a_rank_stops_participating(timeouts: dict, kind: str) -> None:
    row = timeouts["kinds"][kind]
    assert row["ok"], row
    assert "CommTimeout" in row["example"] and "group" in row["example"], row


@pytest.mark.parametrize("kind", sorted(R.PER_CALL_KINDS - {"barrier_per_call"}) + ["recv"])
def test_per_call_wait_honours_its_timeout(timeouts: dict, kind: str) -> None:
    row = timeouts["kinds"][kind]
    assert row["ok"], row


def test_timed_out_receive_does_not_swallow_the_next_message(timeouts: dict) -> None:
    assert timeouts["late_recv_got"] == 42.0, timeouts["late_recv_got"]


def test_no_rank_hangs_in_the_timeout_run(timeouts: dict) -> None:
    assert timeouts["hung_ranks"] == []
