"""Parameter server training: SSP staleness bound, no update lost or applied twice, sync exactness,
a dedicated server, and signSGD majority vote (4 real processes, one spawn)."""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from multiproc import free_port, run_world

N, STEPS, S_BOUND = 12, 15, 2
TARGETS = np.arange(3 * 6, dtype=np.float32).reshape(3, 6) / 7.0 - 1.0


def _grad(w: int, c: int) -> torch.Tensor:
    g = torch.zeros(N, dtype=torch.float64)
    g[(5 * w + c) % N] = (w + 1) * 1000 + c  # unique integers: exact sums in float64
    return g


def _ps_world(rank: int, size: int, port: int) -> dict:
    from commlayer.topologies import World

    world = World(rank, size, "127.0.0.1", int(os.environ["MASTER_PORT"]), timeout=60)
    out: dict = {}
    # A: asynchronous SSP, two co-located servers, the first worker slow.
    ps = world.parameter_server(servers=[0, 1], mode="async", staleness=S_BOUND, lr=1.0)
    ps.init(torch.full((N,), 5.0, dtype=torch.float64))
    for c in range(STEPS):
        if rank == 0:
            time.sleep(0.03)
        ps.step(_grad(rank, c))
    ps.close()
    out["seen"] = ps.max_staleness_seen
    out["stats"] = ps.server_stats()
    out["params"] = {s: p.numpy() for s, p in ps.server_params().items()}
    # B: synchronous, one dedicated server (rank 3), plain averaging of worker gradients.
    ps = world.parameter_server(servers=[3], workers=[0, 1, 2], mode="sync", lr=0.5)
    if rank == 3:
        ps.serve()
        out["dedicated"] = ps.server_stats()
    else:
        p = ps.init(torch.zeros(6))
        for _ in range(STEPS):
            p = ps.step(p - torch.from_numpy(TARGETS[rank]))
        ps.close()
        out["sync"] = p.numpy()
    # C: signSGD with majority vote, co-located server, 1-bit uplink.
    ps = world.parameter_server(servers=1, workers=[0, 1, 2], mode="sync", lr=0.1, uplink="sign:scale=none")
    if rank < 3:
        p = ps.init(torch.zeros(6))
        for _ in range(STEPS):
            p = ps.step(p - torch.from_numpy(TARGETS[rank]))
        out["vote"] = p.numpy()
    ps.close()
    world.barrier()
    world.close()
    # D: the zmq backend's all_reduce through co-located parameter servers (COMMLAYER_ALGO=ps).
    import torch.distributed as dist

    os.environ["COMMLAYER_ALGO"], os.environ["COMMLAYER_PS_SERVERS"] = "ps", "2"
    dist.init_process_group("zmq", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    t = torch.arange(1001, dtype=torch.float32) * (rank + 1)
    dist.all_reduce(t)
    i = torch.tensor([rank, -rank], dtype=torch.int64)
    dist.all_reduce(i, op=dist.ReduceOp.MAX)
    out["backend"] = (t.numpy(), i.tolist())
    dist.destroy_process_group()
    return out


def test_parameter_server_training() -> None:
    res = run_world(_ps_world, 4, free_port(), timeout=120)
    # A: the staleness bound is reached but never exceeded; every update applied exactly once.
    assert max(r["seen"] for r in res) == S_BOUND
    assert all(r["seen"] <= S_BOUND for r in res)
    shards = {**res[0]["stats"], **res[1]["stats"]}
    assert sorted(shards) == [0, 1]
    for st in shards.values():
        assert st["updates"] == 4 * STEPS and st["applied_keys"] == 4 * STEPS
        assert st["duplicates"] == 0 and st["out_of_order"] == 0
        assert st["max_staleness"] <= S_BOUND
        assert st["clocks"] == {w: STEPS for w in range(4)}
    final = np.concatenate([res[0]["params"][0], res[1]["params"][1]])
    expect = np.full(N, 5.0) - sum(_grad(w, c).numpy() for w in range(4) for c in range(STEPS))
    assert np.array_equal(final, expect)
    # B: synchronous steps on the mean gradient, identical on every worker.
    p = np.zeros(6, dtype=np.float64)
    for _ in range(STEPS):
        p = p - 0.5 * (p - TARGETS.mean(0))
    for r in res[:3]:
        assert np.allclose(r["sync"], p, atol=1e-5)
    assert res[3]["dedicated"][0]["version"] == STEPS
    # C: majority vote of the workers' gradient signs (ties give 0).
    p = np.zeros(6, dtype=np.float32)
    for _ in range(STEPS):
        votes = np.sign(np.sum(np.where(p - TARGETS < 0, -1.0, 1.0), axis=0))
        p = (p - np.float32(0.1) * votes).astype(np.float32)
    for r in res[:3]:
        assert np.allclose(r["vote"], p, atol=1e-6)
    # D: backend all_reduce with COMMLAYER_ALGO=ps.
    for r in res:
        assert np.array_equal(r["backend"][0], np.arange(1001, dtype=np.float32) * 10)
        assert r["backend"][1] == [3, 0]
