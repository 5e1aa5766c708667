"""COMMLAYER_ALGO=auto: over network links the backend runs the planner's plans; on one machine it does not."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from multiproc import run_world


def _worker(rank: int, world: int, envs: list[dict[str, str]]) -> dict:
    os.environ.update(envs[rank])
    dist.init_process_group("zmq", timeout=timedelta(seconds=60))
    pg = dist.group.WORLD
    out: dict = {"adaptive": pg.adaptive is not None}
    for n in (10, 300_000):  # below and above the planner's 64 KiB floor
        x = torch.randint(-1000, 1000, (n,), generator=torch.Generator().manual_seed(rank)).double()
        ref = [torch.randint(-1000, 1000, (n,), generator=torch.Generator().manual_seed(r)).double() for r in range(world)]
        dist.all_reduce(x)
        out[f"exact{n}"] = torch.equal(x, sum(ref))
    if pg.adaptive is not None:
        out["plans"] = [(p["algo"], p["version"]) for p in pg.adaptive.planner.report()["plans"]]
    dist.destroy_process_group()
    return out


def test_planner_runs_over_network_links_only() -> None:
    from commlayer.wan import emulated_world

    with emulated_world(3, "datacenter", mode="relay") as w:
        envs = [{k: str(v) for k, v in w.env(r).items()} for r in range(3)]
        res = run_world(_worker, 3, envs, timeout=120)
    for r in res:
        assert r["adaptive"] and r["exact10"] and r["exact300000"], r
        assert r["plans"] and r["plans"] == res[0]["plans"], r  # every rank ran the same plan
    local = run_world(_worker, 3, [{}, {}, {}], timeout=120)
    assert all(not r["adaptive"] and r["exact300000"] for r in local), local
