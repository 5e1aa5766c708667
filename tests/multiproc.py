"""Run a function on N real processes (spawned, real sockets) and collect per-rank results.

Used by every distributed test. The function must live at module level of an importable
module (spawn re-imports it). Results travel back through a multiprocessing queue (test
harness only; nothing here is on commlayer's wire).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable, Sequence


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(fn: Callable[..., Any], rank: int, world_size: int, env: dict[str, str], args: Sequence[Any], q: Any) -> None:
    os.environ.update(env)
    os.environ["RANK"] = str(rank)
    os.environ["LOCAL_RANK"] = str(rank)
    try:
        result = fn(rank, world_size, *args)
        q.put((rank, True, result))
    except BaseException as exc:  # report everything, including SystemExit
        q.put((rank, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def run_world(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    allow_failures: bool = False,
) -> list[Any]:
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes.

    Sets MASTER_ADDR/MASTER_PORT/WORLD_SIZE/RANK like torchrun does.

    Args:
        fn: module-level function.
        world_size: number of processes.
        *args: extra picklable arguments.
        timeout: seconds for the whole run; on expiry every child is killed and the test fails.
        env: extra environment variables for the children.
        allow_failures: if True, return exceptions (as strings prefixed "ERROR: ") instead of raising.

    Returns:
        The per-rank return values, indexed by rank.
    """
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    base_env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "OMP_NUM_THREADS": "1",
    }
    base_env.update(env or {})
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, base_env, args, q), daemon=True) for r in range(world_size)]
    # Spawned children import torch before _child runs, so thread settings must be in the
    # environment they inherit (torchrun likewise sets OMP_NUM_THREADS=1 for its workers).
    saved = {k: os.environ.get(k) for k in base_env}
    os.environ.update(base_env)
    try:
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"run_world({fn.__name__}, {world_size}) timed out after {timeout}s; finished ranks: {sorted(results)}, failed: {sorted(errors)}")
            try:
                rank, ok, value = q.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results and r not in errors]
                for r in dead:
                    errors[r] = f"process exited with code {procs[r].exitcode} without reporting"
                continue
            (results if ok else errors)[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        q.close()
    if errors and not allow_failures:
        msg = "\n".join(f"--- rank {r} ---\n{e}" for r, e in sorted(errors.items()))
        raise AssertionError(f"{len(errors)} rank(s) failed:\n{msg}")
    return [results[r] if r in results else f"ERROR: {errors[r]}" for r in range(world_size)]
