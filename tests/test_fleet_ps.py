"""Parameter-server failure: SIGKILL of the server process mid-training.

With a replica, workers fail over within the liveness bound and training finishes with every
update applied exactly once (exact integer arithmetic: the result is compared with the sum the
test computes). Without one, every worker stops with a PeerFailure naming the server, within the
same bound, far below the group timeout.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from commlayer.testing.launch import Ranks

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N, STEPS, KILL_AFTER, TIMEOUT = 64, 30, 6, 60.0


def _grad(w: int, c: int) -> torch.Tensor:
    g = torch.zeros(N, dtype=torch.float64)
    g[(5 * w + c) % N] = 2 * ((w + 1) * 100 + c)  # even integers: the mean over two workers stays exact
    return g


def _rank(rank: int, size: int, q, replica: bool) -> dict:
    from commlayer.topologies import World

    world = World(rank, size, "127.0.0.1", int(os.environ["MASTER_PORT"]), timeout=TIMEOUT)
    ps = world.parameter_server(servers=[0], workers=[1, 2], replicas=[3] if replica else None, mode="sync", lr=1.0)
    if rank in (0, 3):
        q.put((rank, "up", os.getpid()))
        ps.serve()
        return {"params": ps.server_params()[0].tolist(), "stats": ps.server_stats()[0]}
    params = ps.init(torch.zeros(N, dtype=torch.float64))
    step_t = []
    try:
        for c in range(STEPS):
            t0 = time.monotonic()
            params = ps.step(_grad(rank, c))
            step_t.append((t0, time.monotonic()))
            if c == KILL_AFTER:
                q.put((rank, "going", c))
            time.sleep(0.02)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "at": time.monotonic(), "steps": len(step_t)}
    finally:
        ps.close()
    return {"params": params.tolist(), "failed_over": dict(ps.failed_over), "slowest": max(b - a for a, b in step_t),
            "failover_done": max(step_t, key=lambda ab: ab[1] - ab[0])[1]}


def _expected() -> list[float]:
    p = torch.zeros(N, dtype=torch.float64)
    for c in range(STEPS):
        p -= (_grad(1, c) + _grad(2, c)) / 2
    return p.tolist()


def _run(replica: bool) -> tuple[float, dict]:
    with Ranks(_rank, 4, replica, quiet=True) as w:
        w.wait_for("going", [1, 2], 90)
        killed = time.monotonic()
        w.procs[0].kill()
        got = w.wait_for("result", [1, 2, 3] if replica else [1, 2], 120)
        return killed, {r: v for r, (_k, v) in got.items()}


def test_workers_fail_over_to_the_replica_and_lose_no_update() -> None:
    killed, res = _run(replica=True)
    want = _expected()
    for w in (1, 2):
        assert "error" not in res[w], res[w]
        assert res[w]["params"] == want
        assert list(res[w]["failed_over"]) == [0] and "rank 0" in res[w]["failed_over"][0]
        assert res[w]["failover_done"] - killed < TIMEOUT / 4, res[w]  # the liveness bound, not the group timeout
    assert res[3]["params"] == want and res[3]["stats"]["duplicates"] == 0


def test_without_a_replica_workers_stop_with_an_error_naming_the_server() -> None:
    killed, res = _run(replica=False)
    for w in (1, 2):
        err = res[w].get("error", "")
        assert "PeerFailure" in err and "server rank 0 failed" in err and "replicas=" in err, res[w]
        assert res[w]["at"] - killed < TIMEOUT / 4, res[w]
