"""Asynchronous parameter server: a worker that dies leaves the quorum; the others finish, nothing lost or doubled."""

from __future__ import annotations

import os

import torch

from multiproc import run_world

N, STEPS, DIE_AT = 8, 12, 4


def _grad(w: int, c: int) -> torch.Tensor:
    g = torch.zeros(N, dtype=torch.float64)
    g[(3 * w + c) % N] = (w + 1) * 100 + c  # unique integers: exact sums
    return g


def _worker(rank: int, size: int) -> dict:
    from commlayer.topologies import World

    world = World(rank, size, "127.0.0.1", int(os.environ["MASTER_PORT"]), timeout=30)
    ps = world.parameter_server(servers=[0], mode="async", staleness=1, lr=1.0)
    ps.init(torch.zeros(N, dtype=torch.float64))
    for c in range(STEPS):
        if rank == size - 1 and c == DIE_AT:
            os._exit(3)  # a device drops off the network mid-training
        ps.step(_grad(rank, c))
    out = {"steps": STEPS}
    if rank == 0:
        # wait until the other live worker has pushed everything, then read the server's books
        import time

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            clocks = ps.server_stats()[0]["clocks"]
            if all(clocks.get(w, 0) >= STEPS for w in range(size - 1)):
                break
            time.sleep(0.05)
        out["stats"] = ps.server_stats()[0]
        out["params"] = ps.server_params()[0].tolist()
    ps.close()
    return out


def test_async_ps_continues_without_a_dead_worker() -> None:
    size = 3
    res = run_world(_worker, size, timeout=120, allow_failures=True)
    assert isinstance(res[0], dict) and isinstance(res[1], dict), res  # the survivors finished all their steps
    stats = res[0]["stats"]
    assert stats["duplicates"] == 0 and stats["out_of_order"] == 0, stats
    assert stats["max_staleness"] <= 1, stats
    clocks = stats["clocks"]
    assert clocks[0] == STEPS and clocks[1] == STEPS and clocks.get(2, 0) == DIE_AT, clocks
    # Server-side SGD (lr 1) from zeros: params = -(sum of every update that arrived), each exactly once.
    expect = torch.zeros(N, dtype=torch.float64)
    for w, n in ((0, STEPS), (1, STEPS), (2, DIE_AT)):
        for c in range(n):
            expect -= _grad(w, c)
    assert res[0]["params"] == expect.tolist(), (res[0]["params"], expect)
