"""The liveness harness: one run of a workload on a fresh emulated world, or one real rank failure.

Used by ``tests/test_liveness*.py`` (CI sizes) and ``benchmarks/liveness.py`` (the matrix of link
cells x workloads, with gloo side by side). Every rank is a process of its own, started in its
network namespace (root needed) or, for ``failure_once("local-kill")``, on this machine:

* :func:`run_once`: ``workload`` with ``backend`` on a fresh world of a :class:`Cell`
  (kernel-shaped: :class:`commlayer.wan.kernel.KernelWorld`, veth + ``tbf``; or TUN-emulated:
  :class:`commlayer.wan.netns.NetnsWorld`), optionally freezing rank 1 (SIGSTOP) for a while;
* :func:`failure_once`: a real failure of one rank (local SIGKILL, remote SIGKILL, cut link)
  while every rank loops small all_reduces; detection times per survivor.

Each rank runs :func:`worker` (``python -m commlayer.testing.liveness --worker BACKEND ...``),
which prints READY after init and then one JSON line with its result. ``LIVENESS_DEBUG=1`` logs
the ranks at INFO and prints their stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
WORLD = 4
PREFIX = "live"  # default start of the namespace and veth names (+ a random tag); pass ``prefix`` to keep apart from others
_WORKER = [sys.executable, "-m", "commlayer.testing.liveness", "--worker"]


@dataclass(frozen=True)
class Cell:
    """A link cell: ``kind`` "kernel" (params up/down Mbit/s, up_q/down_q ms of queue) or "tun"
    (rate Mbit/s, delay/jitter ms, loss fraction)."""

    name: str
    kind: str  # "kernel" or "tun"
    params: dict[str, float]
    stop_s: float = 0.0  # SIGSTOP rank 1 for this long (0 = no stall)


def worker(backend: str, workload: str, sizes_mib: list[float], steps: int, timeout_s: float) -> dict[str, Any]:
    """Runs in a rank's namespace; prints READY after init, then one JSON line with its result."""
    import resource
    from datetime import timedelta

    import numpy as np
    import torch
    import torch.distributed as dist

    if backend == "zmq":
        import commlayer  # noqa: F401  (registers the backend)
    if os.environ.get("LIVENESS_DEBUG"):
        import logging

        logging.basicConfig(level=logging.INFO, format="%(relativeCreated)8.0f %(name)s %(message)s")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out: dict[str, Any] = {"rank": rank, "error": None, "exact": None, "times": {}}
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    try:
        dist.barrier()
        print("READY", flush=True)
        if workload == "loop":  # small all_reduces until a peer fails (failure-detection runs)
            t = torch.ones(1 << 14)
            end = time.monotonic() + timeout_s
            while time.monotonic() < end:
                dist.all_reduce(t)
                time.sleep(0.01)
        elif workload == "allreduce":
            exact = True
            for mib in sizes_mib:
                n = int(mib * (1 << 20)) // 4
                base = np.arange(n, dtype=np.int64) % 1000
                t = torch.from_numpy(((base * (rank + 1)) % 997).astype(np.float32))
                want = sum((((base * (r + 1)) % 997) for r in range(world)), np.zeros(n, dtype=np.int64)).astype(np.float32)
                t0 = time.monotonic()
                dist.all_reduce(t)
                out["times"][f"{mib:g}MiB"] = time.monotonic() - t0
                exact &= bool(np.array_equal(t.numpy(), want))
            out["exact"] = exact
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
            ddp = DDP(model)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
            gen = torch.Generator().manual_seed(100 + rank)
            t0 = time.monotonic()
            for _ in range(steps):
                x, y = torch.randn(32, 64, generator=gen), torch.randint(0, 10, (32,), generator=gen)
                opt.zero_grad()
                torch.nn.functional.cross_entropy(ddp(x), y).backward()
                opt.step()
            out["times"]["ddp"] = time.monotonic() - t0
            flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            out["params"] = flat.tolist()
    except Exception as exc:  # a false death (or any other failure) is what this benchmark counts
        out["t_err"] = time.monotonic()
        out["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        out["peer"] = getattr(exc, "peer", None)
    out["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        dist.destroy_process_group()
    except Exception:
        pass
    return out


def _world(cell: Cell, world: int = WORLD, prefix: str = PREFIX) -> Any:
    if cell.kind == "kernel":
        from commlayer.wan.kernel import AccessLink, KernelWorld

        p = cell.params
        return KernelWorld([AccessLink(p["up"], p["down"], p["up_q"], p["down_q"])] * world, prefix=prefix)
    from commlayer.wan.matrix import uniform_matrix
    from commlayer.wan.netns import NetnsWorld
    from commlayer.wan.spec import LinkSpec

    p = cell.params
    spec = LinkSpec(delay_ms=p["delay"], rate_mbit=p["rate"], jitter_ms=p["jitter"], loss=p["loss"], queue_ms=500.0)
    return NetnsWorld(uniform_matrix(cell.name, world, spec), seed=int(time.time()), prefix=prefix)


def _env(w: Any, rank: int, world: int) -> dict[str, str]:
    if hasattr(w, "env"):
        return w.env(rank)
    from commlayer.wan.world import NETNS_COMMLAYER_PORT, NETNS_MASTER_PORT, _torchrun_env

    return {**_torchrun_env(rank, world, w.addresses[0], NETNS_MASTER_PORT), "COMMLAYER_HOST": w.addresses[rank],
            "COMMLAYER_PORT": str(NETNS_COMMLAYER_PORT), "GLOO_SOCKET_IFNAME": "wan0", "TP_SOCKET_IFNAME": "wan0"}


def run_once(cell: Cell, backend: str, workload: str, sizes: list[float], steps: int, timeout_s: float,
             extra_env: dict[str, str] | None = None, world: int = WORLD, prefix: str = PREFIX) -> dict[str, Any]:
    """One run of ``workload`` with ``backend`` on a fresh world of ``cell``; per-rank results.

    ``extra_env`` is added to every rank's environment (e.g. ``COMMLAYER_ALGO``); ``prefix`` starts the
    names of the world's namespaces and veths (<= 6 characters; each world adds a random tag).
    """
    t_start = time.monotonic()
    with _world(cell, world, prefix) as w:
        procs = []
        for r in range(world):
            env = {**os.environ, **_env(w, r, world), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(extra_env or {})}
            cmd = [*_WORKER, backend, "--workloads", workload,
                   "--sizes", ",".join(f"{s:g}" for s in sizes), "--steps", str(steps), "--timeout", str(timeout_s)]
            procs.append(w.popen(r, cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        stopped = None
        try:
            if cell.stop_s:
                line = procs[1].stdout.readline()  # READY once the group is up
                if line.strip() == "READY":
                    time.sleep(1.0)
                    os.kill(procs[1].pid, signal.SIGSTOP)
                    stopped = time.monotonic()
                    time.sleep(cell.stop_s)
                    os.kill(procs[1].pid, signal.SIGCONT)
                    stopped = time.monotonic() - stopped
            outs = []
            for r, p in enumerate(procs):
                try:
                    so, se = p.communicate(timeout=max(10.0, timeout_s * 2 - (time.monotonic() - t_start)))
                except subprocess.TimeoutExpired:
                    p.kill()
                    so, se = p.communicate(timeout=10)
                res = None
                if os.environ.get("LIVENESS_DEBUG"):
                    print(f"--- rank {r} stderr:\n{se[-3000:]}", file=sys.stderr)
                for line in so.splitlines():
                    if line.startswith("{"):
                        res = json.loads(line)
                outs.append(res or {"rank": r, "error": f"no result (exit {p.returncode}): {se[-600:]}", "exact": None,
                                    "times": {}, "rss_mib": None})
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=10)
    return {"cell": cell.name, "backend": backend, "workload": workload, "ranks": outs, "stopped_s": stopped,
            "wall_s": time.monotonic() - t_start}


def failure_once(kind: str, world: int = 3, victim: int = 2, timeout_s: float = 60.0, prefix: str = PREFIX) -> dict[str, Any]:
    """A real failure of rank ``victim`` while every rank loops small all_reduces (zmq backend).

    ``kind``: "local-kill" (SIGKILL, all ranks on this machine: ipc and shared memory), "remote-kill"
    (SIGKILL, every rank in its own namespace: FIN/RST over TCP) or "cut" (the victim's link is
    unplugged: no FIN, no RST). Detection is measured from the moment the victim is dead (its pidfd
    became readable) or its link was cut, to each survivor's exception (``time.monotonic`` is
    system-wide).
    """
    from commlayer.wan.kernel import AccessLink, KernelWorld

    w = None if kind == "local-kill" else KernelWorld([AccessLink(100, 100, 50, 50)] * world, prefix=prefix)
    cmd = [*_WORKER, "zmq", "--workloads", "loop", "--timeout", str(timeout_s)]
    port = str(29700 + os.getpid() % 200)
    procs: list[Any] = []  # Popen[str] with stdout and stderr pipes
    try:
        for r in range(world):
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
            env.update(w.env(r) if w is not None else {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(r),
                                                      "WORLD_SIZE": str(world), "LOCAL_RANK": str(r)})
            popen = w.popen if w is not None else (lambda _r, c, **kw: subprocess.Popen(c, **kw))
            procs.append(popen(r, cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        ready = [p.stdout.readline().strip() == "READY" for p in procs]
        if not all(ready):
            return {"kind": kind, "error": f"setup failed: {[p.stderr.read()[-500:] for p in procs if p.poll() is not None]}"}
        time.sleep(1.0)
        if kind == "cut":
            assert w is not None  # only "local-kill" runs without namespaces
            w.cut(victim)
            t_fail = time.monotonic()
        else:
            pidfd = os.pidfd_open(procs[victim].pid)
            os.kill(procs[victim].pid, signal.SIGKILL)
            import select

            select.select([pidfd], [], [], 10.0)
            t_fail = time.monotonic()
            os.close(pidfd)
        res: dict[int, dict[str, Any]] = {}
        for r, p in enumerate(procs):
            if r == victim:
                continue
            so, _se = p.communicate(timeout=timeout_s + 30)
            res[r] = next((json.loads(x) for x in so.splitlines() if x.startswith("{")), {"error": "no result"})
        detect = {r: (v["t_err"] - t_fail if "t_err" in v else None) for r, v in res.items()}
        named = all(v.get("error") and f"rank {victim}" in v["error"] for v in res.values())
        return {"kind": kind, "detect_s": detect, "named": named, "errors": [v.get("error", "")[:300] for v in res.values()]}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        if w is not None:
            w.close()


def main(argv: list[str] | None = None) -> int:
    """The rank entry point: ``--worker BACKEND --workloads W --sizes MiB,... --steps N --timeout S``."""
    ap = argparse.ArgumentParser(description="one rank of a liveness run (started by run_once / failure_once)")
    ap.add_argument("--worker", required=True, help="backend: zmq or gloo")
    ap.add_argument("--workloads", default="allreduce", help="allreduce, ddp or loop")
    ap.add_argument("--sizes", default="2,8", help="all_reduce sizes in MiB")
    ap.add_argument("--steps", type=int, default=30, help="DDP steps")
    ap.add_argument("--timeout", type=float, default=300.0, help="process-group timeout, s")
    a = ap.parse_args(argv)
    sizes = [float(s) for s in a.sizes.split(",") if s]
    print(json.dumps(worker(a.worker, a.workloads, sizes, a.steps, a.timeout)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
