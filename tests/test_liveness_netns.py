"""Liveness on kernel-shaped links (every rank in its own namespace, veth + tbf): no false deaths
on a bufferbloated 2 Mbit/s link or through an 8 s stall of a remote rank; real failures (a cut link
without FIN/RST, a killed remote process) still caught and named. CI sizes of
``benchmarks/liveness.py``'s runs (:mod:`commlayer.testing.liveness`; 3 ranks, one run each).

Skipped, with the reason, when not root or without ``ip``/``tc``/TUN (namespaces need them).
"""

from __future__ import annotations

import pytest

from commlayer.testing import liveness as L
from commlayer.wan.kernel import tc_unavailable_reason

REASON = tc_unavailable_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=str(REASON))]


def _ok(run: dict) -> None:
    errors = [r["error"] for r in run["ranks"] if r["error"]]
    assert not errors, errors
    assert all(r["exact"] for r in run["ranks"]), "all_reduce result differs from the numpy sum"


def test_bufferbloated_2mbit_link_has_no_false_death() -> None:
    """2 Mbit/s up and down with 3 s of queue each way (loss-based TCP fills it): heartbeats and
    TCP acknowledgements wait seconds behind payload, yet nobody is declared dead."""
    cell = L.Cell("bloat", "kernel", {"up": 2, "down": 2, "up_q": 3000, "down_q": 3000})
    _ok(L.run_once(cell, "zmq", "allreduce", [2.0], 0, timeout_s=240.0, world=3))


def test_remote_rank_stopped_8s_is_waited_for() -> None:
    """SIGSTOP of a remote rank for 8 s mid-all_reduce: its host keeps acknowledging, so it is a stall,
    not a death; after SIGCONT the result is exact."""
    cell = L.Cell("stop", "kernel", {"up": 10, "down": 10, "up_q": 500, "down_q": 500}, stop_s=8.0)
    run = L.run_once(cell, "zmq", "allreduce", [4.0], 0, timeout_s=120.0, world=3)
    assert run["stopped_s"] is not None and run["stopped_s"] >= 8.0, run["stopped_s"]
    _ok(run)


@pytest.mark.parametrize("kind,bound_s", [("cut", 10.0), ("remote-kill", 1.0)])
def test_real_remote_failures_are_caught_and_named(kind: str, bound_s: float) -> None:
    """A link unplugged without FIN/RST (silent: no bytes, no acks) and a SIGKILLed remote process:
    every survivor raises a PeerFailure naming rank 2, within the issue's bound."""
    r = L.failure_once(kind, world=3, victim=2, timeout_s=60.0)
    assert "error" not in r, r
    assert r["named"] and all("PeerFailure" in e for e in r["errors"]), r["errors"]
    assert all(d is not None and d <= bound_s for d in r["detect_s"].values()), r
