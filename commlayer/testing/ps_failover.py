"""The parameter-server failover run: SIGKILL of the server process mid-training, with or without a replica.

Four ranks over a :class:`~commlayer.topologies.World`: rank 0 serves, ranks 1 and 2 train, rank 3
is the server's replica (or idle without one). The workers push exact integer gradients
(:func:`grad`), so every update applied exactly once gives :func:`expected` bit for bit.
``tests/test_fleet_ps.py`` checks the outcome; ``benchmarks/fleet.py --parts ps`` times it.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from commlayer.testing.launch import Ranks

N, STEPS, KILL_AFTER, TIMEOUT = 64, 30, 6, 60.0


def grad(w: int, c: int) -> torch.Tensor:
    """Worker ``w``'s gradient at step ``c``: one even integer, so the mean over two workers stays exact."""
    g = torch.zeros(N, dtype=torch.float64)
    g[(5 * w + c) % N] = 2 * ((w + 1) * 100 + c)
    return g


def rank_main(rank: int, size: int, q: Any, replica: bool) -> dict:
    """One rank of the run (for :class:`~commlayer.testing.launch.Ranks`); its result dict."""
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
            params = ps.step(grad(rank, c))
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


def expected() -> list[float]:
    """The parameters after every step applied exactly once (SGD, lr 1, the mean of the two workers)."""
    p = torch.zeros(N, dtype=torch.float64)
    for c in range(STEPS):
        p -= (grad(1, c) + grad(2, c)) / 2
    return p.tolist()


def run(replica: bool) -> tuple[float, dict]:
    """Starts the four ranks, kills the server once both workers are past step ``KILL_AFTER``.

    Returns:
        (``time.monotonic()`` of the kill, {rank: result} of the surviving ranks that report).
    """
    with Ranks(rank_main, 4, replica, quiet=True) as w:
        w.wait_for("going", [1, 2], 90)
        killed = time.monotonic()
        w.procs[0].kill()
        got = w.wait_for("result", [1, 2, 3] if replica else [1, 2], 120)
        return killed, {r: v for r, (_k, v) in got.items()}
