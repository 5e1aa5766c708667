"""Soak: thousands of random collectives, each checked; threads, descriptors and memory must stay flat."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from commlayer.testing.reliability.harness import World, census, world_transport, commlayer_threads, init_zmq
from commlayer.testing.reliability.ops import run_ops

def soak_worker(rank: int, world: int, events: Any, seed: int, n_ops: int, max_elems: int, limit: float) -> dict:
    """``n_ops`` random collectives, each checked element-wise against a locally computed reference."""
    t_init = census()
    init_zmq(timeout=120.0)
    mismatches: list[str] = []
    run_ops(rank, world, seed, 0, 20, max_elems, True, mismatches)  # warm-up: lazily created threads and buffers
    before = census()
    t0 = time.monotonic()
    t_end = t0 + limit
    rss_mb: list[int] = []  # every tenth of the run: a plateau means bounded memory
    every = max(50, n_ops // 10 // 50 * 50)

    def stop(i: int) -> bool:
        if i % every == 0:
            rss_mb.append(round(census()["rss_kb"] / 1024))
        return i % 50 == 0 and _agree_stop(time.monotonic() > t_end)

    done = 20 + run_ops(rank, world, seed, 20, n_ops - 20, max_elems, True, mismatches, stop=stop)
    secs = time.monotonic() - t0
    after = census()
    mb = world_transport().mailbox
    stats = mb.stats()
    with mb._lock:  # which channels still hold messages nobody took (diagnostic)
        stats["left_by_channel"] = {}
        for key in list(mb._box):
            stats["left_by_channel"][key[0]] = stats["left_by_channel"].get(key[0], 0) + 1
    dist.destroy_process_group()
    return {"ops": done, "mismatches": len(mismatches), "first_mismatches": mismatches[:5], "seconds": round(secs, 1),
            "before_init": t_init, "before": before, "after": after, "after_destroy": census(),
            "threads_left": commlayer_threads(), "mailbox": stats, "rss_mb": rss_mb}


def _agree_stop(mine: bool) -> bool:
    """All ranks stop at the same operation if any of them ran out of time."""
    t = torch.tensor([int(mine)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def run_soak(n_ops: int, seed: int, world: int = 4, max_elems: int = 300_000, time_limit: float = 540.0) -> dict:
    """Runs the soak on ``world`` ranks; per-rank figures and the totals."""
    w = World(soak_worker, world, seed, n_ops, max_elems, time_limit).start()
    try:
        res = w.wait_for("result", list(range(world)), time_limit + 240.0)
    finally:
        leftovers = w.close(grace=15.0)
    out: dict[str, Any] = {"world": world, "ops_requested": n_ops, "hangs": len(leftovers) + world - len(res), "crashes": 0}
    per_rank = {}
    for r in range(world):
        if r not in res:
            continue
        kind, v = res[r]
        if kind != "result":
            out["crashes"] += 1
            out.setdefault("crash_errors", {})[r] = v[-1500:]
            continue
        per_rank[r] = v
    if per_rank:
        vs = list(per_rank.values())
        out.update({
            "ops": min(v["ops"] for v in vs), "mismatches": sum(v["mismatches"] for v in vs),
            "first_mismatches": [m for v in vs for m in v["first_mismatches"]][:5],
            "seconds": max(v["seconds"] for v in vs),
            "threads_before_after": [(v["before"]["threads"], v["after"]["threads"]) for v in vs],
            "fds_before_after": [(v["before"]["fds"], v["after"]["fds"]) for v in vs],
            "rss_mb_before_after": [(round(v["before"]["rss_kb"] / 1024), round(v["after"]["rss_kb"] / 1024)) for v in vs],
            "fds_before_init_after_destroy": [(v["before_init"]["fds"], v["after_destroy"]["fds"]) for v in vs],
            "threads_left": sorted({t for v in vs for t in v["threads_left"]}),
            "mailbox_after": [v["mailbox"] for v in vs],
            "rss_mb_every_tenth": [v["rss_mb"] for v in vs],
        })
    return out
