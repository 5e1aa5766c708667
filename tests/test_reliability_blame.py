"""Blame only the peer that failed: a rank frozen long enough for its peers to drop it reports,
once resumed, that IT was stalled; the peers name it. (Kill-injection blame accuracy over many
runs: ``benchmarks/reliability.py --kill N``, the misnamed count.)"""

from __future__ import annotations

import os
import signal
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from multiproc import run_world

FREEZE_S = 8.0


def _freeze_worker(rank: int, world: int) -> dict:
    dist.init_process_group("zmq", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    pids = torch.zeros(world, dtype=torch.int64)
    pids[rank] = os.getpid()
    dist.all_reduce(pids)
    out: dict = {"error": None}
    try:
        for i in range(100_000):
            if rank == 0 and i == 20:  # freeze rank 1 for 8 s (as SIGSTOP from a debugger or a swap storm)
                victim = int(pids[1])
                os.kill(victim, signal.SIGSTOP)
                threading.Timer(FREEZE_S, os.kill, (victim, signal.SIGCONT)).start()
            dist.all_reduce(torch.ones(16))
    except Exception as exc:
        out["error"] = str(exc)
        out["peer"] = getattr(exc, "peer", getattr(exc.__cause__, "peer", None))
    if rank == 0:
        time.sleep(max(0.0, FREEZE_S + 1.0))  # stay until rank 1 runs again, so it sees this rank's goodbye or drop
    dist.destroy_process_group()
    return out


def test_resumed_rank_blames_itself_and_peer_blames_it() -> None:
    res = run_world(_freeze_worker, 2, timeout=150, env={"COMMLAYER_HEARTBEAT": "1"})
    r0, r1 = res
    assert r0["error"] is not None and "rank 1" in r0["error"], r0
    assert r1["error"] is not None, r1
    assert "this rank (rank 1)" in r1["error"] and "stall" in r1["error"], r1["error"]
    assert "rank 0 is gone" not in r1["error"] and "rank 0 failed" not in r1["error"], r1["error"]
