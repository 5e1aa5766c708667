"""Parameter-server failure: SIGKILL of the server process mid-training (:mod:`commlayer.testing.ps_failover`).

With a replica, workers fail over within the liveness bound and training finishes with every
update applied exactly once (exact integer arithmetic: the result is compared with the plain sum
of the pushed gradients, ``ps_failover.expected``). Without one, every worker stops with a PeerFailure naming the server, within the
same bound, far below the group timeout.
"""

from __future__ import annotations

import pytest

from commlayer.testing.ps_failover import TIMEOUT, expected, run

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_workers_fail_over_to_the_replica_and_lose_no_update() -> None:
    killed, res = run(replica=True)
    want = expected()
    for w in (1, 2):
        assert "error" not in res[w], res[w]
        assert res[w]["params"] == want
        assert list(res[w]["failed_over"]) == [0] and "rank 0" in res[w]["failed_over"][0]
        assert res[w]["failover_done"] - killed < TIMEOUT / 4, res[w]  # the liveness bound, not the group timeout
    assert res[3]["params"] == want and res[3]["stats"]["duplicates"] == 0


def test_without_a_replica_workers_stop_with_an_error_naming_the_server() -> None:
    killed, res = run(replica=False)
    for w in (1, 2):
        err = res[w].get("error", "")
        assert "PeerFailure" in err and "server rank 0 failed" in err and "replicas=" in err, res[w]
        assert res[w]["at"] - killed < TIMEOUT / 4, res[w]
