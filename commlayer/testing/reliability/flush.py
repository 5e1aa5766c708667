"""A broadcast whose receiver froze and then died mid-transfer: the sender must fail, not hang."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import torch
import torch.distributed as dist

from commlayer.testing.reliability.harness import World, context, init_zmq, remove_stale_ipc

def flush_worker(rank: int, world: int, events: Any, go: Any, nbytes: int, timeout: float) -> dict:
    """Rank 0 broadcasts ``nbytes`` to a rank the parent froze (SIGSTOP) and then kills (SIGKILL)."""
    init_zmq(timeout=timeout)
    dist.barrier()
    events.put((rank, "ready", os.getpid()))
    if rank != 0:
        time.sleep(3 * timeout)  # frozen by the parent
        return {}
    go.wait(timeout=60.0)
    t0 = time.monotonic()
    try:  # three queued broadcasts: the first is on the wire when the receiver dies, the others still queued
        works = [dist.broadcast(torch.ones(nbytes // 4), src=0, async_op=True) for _ in range(3)]
        for wk in works:
            wk.wait()
        out: dict[str, Any] = {"error": None}
    except Exception as exc:
        out = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    out["t_err"] = time.monotonic()
    out["took"] = out["t_err"] - t0
    dist.destroy_process_group()
    return out


def dead_receiver_of_large_send(nbytes: int = 64 << 20, timeout: float = 20.0) -> dict:
    """How long rank 0 takes to fail a broadcast whose receiver froze and then died mid-transfer."""
    go = context().Event()
    w = World(flush_worker, 2, go, nbytes, timeout, env={"COMMLAYER_HEARTBEAT": "1"}).start()
    try:
        ready = w.wait_for("ready", [0, 1], 120.0)
        os.kill(ready[1][1], signal.SIGSTOP)
        go.set()
        time.sleep(1.0)
        t_kill = time.monotonic()
        os.kill(ready[1][1], signal.SIGKILL)
        res = w.wait_for("result", [0], timeout + 60.0)
    finally:
        w.close(grace=10.0)
        remove_stale_ipc([p.pid for p in w.procs if p.pid])
    v = res.get(0, ("", {"error": "rank 0 did not report"}))[1]
    return {"error": v.get("error") if isinstance(v, dict) else v,
            "after_kill_s": round(v["t_err"] - t_kill, 2) if isinstance(v, dict) and "t_err" in v else None}
