"""Kill injection: a rank dies (os._exit, SIGKILL) or freezes (SIGSTOP) during random collectives."""

from __future__ import annotations

import math
import os
import random
import re
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch.distributed as dist

from commlayer.testing.ports import free_port
from commlayer.testing.reliability.harness import World, commlayer_threads, context, fd_diff, fd_names, init_zmq, remove_stale_ipc
from commlayer.testing.reliability.ops import run_ops
from commlayer.transport.errors import CommError

KILL_MODES = ("exit", "sigkill", "sigstop")
DETECT_SLACK = 0.75  # grace before a dropped peer is declared dead (0.25 s) + I/O loop and scheduling


def kill_worker(rank: int, world: int, events: Any, seed: int, victim: int, mode: str, delay: float,
                kill_times: Any, max_elems: int, deadline: float, port2: int) -> dict:
    """One rank of a kill run: random collectives until the victim dies, then a clean shutdown.

    A first init/destroy cycle creates torch's one-time state; the second cycle is the one that
    loses a rank, and after its destroy_process_group the survivor must hold exactly the file
    descriptors (and no commlayer thread) it held after the first. The victim (mode ``exit``)
    calls ``os._exit`` from a timer ``delay`` s into the run, wherever its main thread is; in the
    other modes the parent signals it. Survivors report the error they got and when they got it
    (``time.monotonic`` is system-wide).
    """
    init_zmq(timeout=60.0)
    dist.barrier()
    dist.destroy_process_group()
    base = fd_names()
    os.environ["MASTER_PORT"] = str(port2)
    init_zmq(timeout=60.0)
    events.put((rank, "ready", os.getpid()))
    if rank == victim and mode == "exit":
        def die() -> None:
            kill_times[victim] = time.monotonic()
            os._exit(9)
        timer = threading.Timer(delay, die)
        timer.daemon = True
        timer.start()
    err: tuple[str, str, int | None] | None = None
    t_err = 0.0
    step = 0
    t_end = time.monotonic() + deadline
    mism: list[str] = []
    is_comm = False
    try:
        step = run_ops(rank, world, seed, 0, 10**7, max_elems, False, mism, stop=lambda i: time.monotonic() > t_end)
    except Exception as exc:
        t_err = time.monotonic()
        err = (type(exc).__name__, str(exc)[:600], getattr(exc, "peer", None))
        is_comm = isinstance(exc, CommError)
    t0 = time.monotonic()
    dist.destroy_process_group()
    destroy_s = time.monotonic() - t0
    return {"error": err, "comm_error": is_comm, "t_err": t_err, "steps": step, "destroy_s": destroy_s,
            "threads_left": commlayer_threads(), "fds_added": fd_diff(base, fd_names()), "pid": os.getpid()}


@dataclass
class KillRun:
    """Outcome of one kill run."""

    run: int
    world: int
    victim: int
    mode: str
    delay: float
    clean: bool
    detect_s: float  # worst survivor: kill -> exception
    problems: list[str]
    errors: dict[int, str]
    misnamed: list[str] = field(default_factory=list)  # blamed a survivor that shut down, not the dead rank


def names_rank(msg: str, rank: int) -> bool:
    """True if ``msg`` names ``rank`` as the failed peer ("rank 2 ...", "global rank 2", "from rank 2")."""
    return re.search(rf"\brank {rank}\b", msg) is not None


def kill_once(run: int, seed: int, heartbeat: float, max_elems: int = 1 << 18, modes: Sequence[str] = KILL_MODES,
              worlds: Sequence[int] = (3, 4), limit: float | None = None) -> KillRun:
    """One kill run: a random world size, victim, kill mode and moment. ``limit``: detection bound for 'clean'."""
    rng = random.Random(seed * 31 + run)
    world = rng.choice(list(worlds))
    victim = rng.randrange(world)
    mode = modes[run % len(modes)]
    delay = rng.uniform(0.05, 1.5)
    if limit is None:
        # A dropped connection is seen at once (+ the 0.25 s grace); a frozen peer only when ZeroMQ's
        # heartbeat expires: up to one interval until the next PING, one more for its timeout.
        limit = 2 * heartbeat + (DETECT_SLACK if mode == "sigstop" else 0.0)
    kill_times = context().Array("d", world, lock=False)
    env = {"COMMLAYER_HEARTBEAT": str(heartbeat), "COMMLAYER_LINGER": "1"}
    deadline = 30.0 + 4 * heartbeat  # survivors stop looping after this long even if nothing happens
    w = World(kill_worker, world, seed * 7 + run, victim, mode, delay, kill_times, max_elems, deadline, free_port(), env=env).start()
    problems: list[str] = []
    misnamed: list[str] = []
    errors: dict[int, str] = {}
    detect = math.inf
    try:
        ready = w.wait_for("ready", list(range(world)), 120.0)
        if len(ready) < world or any(k != "ready" for k, _ in ready.values()):
            problems.append(f"setup failed: {ready}")
        else:
            if mode != "exit":
                time.sleep(delay)
                kill_times[victim] = time.monotonic()
                try:
                    os.kill(w.procs[victim].pid, signal.SIGKILL if mode == "sigkill" else signal.SIGSTOP)
                except ProcessLookupError:
                    problems.append(f"rank {victim} exited before it was killed: {[e for e in w.events if e[0] == victim][-1:]}")
            survivors = [r for r in range(world) if r != victim]
            res = w.wait_for("result", survivors, deadline + 30.0)
            worst = 0.0
            for r in survivors:
                if r not in res:
                    problems.append(f"rank {r} hung (no report); its stacks:\n{w.stacks(r)[-3000:]}")
                    continue
                kind, v = res[r]
                if kind != "result":
                    problems.append(f"rank {r} crashed: {v[-400:]}")
                    continue
                if v["error"] is None:
                    problems.append(f"rank {r} finished {v['steps']} ops without noticing the dead rank")
                    continue
                etype, msg, _peer = v["error"]
                errors[r] = f"{etype}: {msg}"
                took = v["t_err"] - kill_times[victim]
                worst = max(worst, took)
                if not v["comm_error"]:
                    problems.append(f"rank {r} raised {etype}, not a CommError: {msg[:200]}")
                elif not names_rank(msg, victim):
                    # A survivor that noticed first and shut down sends BYE; a survivor waiting on it
                    # then blames it instead of the dead rank (see docs/reliability.md).
                    (misnamed if "shut down its process group" in msg else problems).append(
                        f"rank {r}'s error does not name rank {victim}: {etype}: {msg[:300]}")
                if took > limit:
                    problems.append(f"rank {r} needed {took:.2f} s to notice (limit {limit:.1f} s)")
                if v["threads_left"]:
                    problems.append(f"rank {r}: threads left after destroy_process_group: {v['threads_left']}")
                if v["fds_added"]:
                    problems.append(f"rank {r}: destroy_process_group after the failure left more fds open than a clean "
                                    f"init/destroy: {v['fds_added']}")
            detect = worst if errors else math.inf
    finally:
        if mode == "sigstop":
            try:
                os.kill(w.procs[victim].pid, signal.SIGKILL)
            except OSError:
                pass
        leftovers = w.close(grace=15.0)
        orphans = [r for r in leftovers if r != victim]
        if orphans:
            problems.append(f"ranks {orphans} did not exit and were killed")
        for r, p in enumerate(w.procs):
            if r != victim and p.exitcode not in (0, None) and r not in orphans:
                problems.append(f"rank {r} exited with code {p.exitcode}")
        remove_stale_ipc([p.pid for p in w.procs if p.pid])
    return KillRun(run, world, victim, mode, round(delay, 3), not problems and not misnamed, round(detect, 3), problems,
                   errors, misnamed)


def run_kill(n: int, seed: int, heartbeat: float = 2.0, max_elems: int = 1 << 18, log: Callable[[str], None] = print,
             modes: Sequence[str] = KILL_MODES) -> dict:
    """``n`` kill runs; returns the counts, the worst detection time per mode and every unclean run."""
    runs = []
    t0 = time.monotonic()
    for i in range(n):
        r = kill_once(i, seed, heartbeat, max_elems, modes)
        runs.append(r)
        log(f"kill {i + 1}/{n}: world {r.world} victim {r.victim} {r.mode:7s} after {r.delay:.2f} s: "
            f"{'clean' if r.clean else 'UNCLEAN'}, detected in {r.detect_s:.2f} s" + ("" if r.clean else f" {r.problems + r.misnamed}"))
    by_mode = {m: [r.detect_s for r in runs if r.mode == m and math.isfinite(r.detect_s)] for m in modes}
    return {"runs": n, "clean": sum(r.clean for r in runs), "heartbeat_s": heartbeat, "seconds": round(time.monotonic() - t0, 1),
            "worst_detect_s": {m: (max(v) if v else None) for m, v in by_mode.items()},
            "median_detect_s": {m: (sorted(v)[len(v) // 2] if v else None) for m, v in by_mode.items()},
            "unclean": [asdict(r) for r in runs if not r.clean],
            "misnamed_runs": sum(bool(r.misnamed) for r in runs),
            "hard_failures": sum(bool(r.problems) for r in runs),
            "sample_errors": sorted({e.split(":", 1)[0] + ": " + e.split(":", 1)[1][:160] for r in runs[:3] for e in r.errors.values()})}
