"""Liveness on slow, bloated, lossy links: false peer deaths, exactness, peak RSS, time vs gloo.

A matrix of link cells x workloads, each run with the ``zmq`` backend and with gloo on the same
links in the same run. Every rank runs in its own network namespace (root needed):

* kernel-shaped cells (:class:`commlayer.wan.kernel.KernelWorld`, veth + ``tbf`` in a modem
  namespace, loss-based TCP): ``bloat2m`` 2 Mbit/s up and down with a 3 s queue each way,
  ``asym`` 1 Mbit/s up (1 s queue) / 10 Mbit/s down (100 ms), ``sigstop`` 10 Mbit/s with a
  500 ms queue while rank 1 is frozen (SIGSTOP) for 8 s and resumed (SIGCONT);
* TUN-emulated cells (this kernel has no netem; :class:`commlayer.wan.netns.NetnsWorld`):
  ``loss1`` 20 Mbit/s, 20 ms RTT, 1 % random packet loss; ``rtt300`` 20 Mbit/s, 300 ms RTT,
  20 ms jitter.

Workloads: ``allreduce`` (one all_reduce per size, float32 of integers, checked bit-exact against
the numpy sum) and ``ddp`` (30 SGD steps of a small MLP under DistributedDataParallel; the final
parameters must be identical on every rank and match gloo's within 1e-5).

    python benchmarks/liveness.py --runs 3 --json liveness.json          # the whole matrix
    python benchmarks/liveness.py --cells bloat2m --workloads allreduce --sizes 2,8 --runs 3

Figures are medians over runs; a "false death" is any rank of a run raising (no rank is killed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORLD = 4
PREFIX = "live"  # namespaces and veths of this benchmark: never clashes with another user's


@dataclass(frozen=True)
class Cell:
    name: str
    kind: str  # "kernel" or "tun"
    params: dict[str, float]
    stop_s: float = 0.0  # SIGSTOP rank 1 for this long (0 = no stall)


CELLS = {c.name: c for c in (
    Cell("bloat2m", "kernel", {"up": 2, "down": 2, "up_q": 3000, "down_q": 3000}),
    Cell("asym", "kernel", {"up": 1, "down": 10, "up_q": 1000, "down_q": 100}),
    Cell("loss1", "tun", {"rate": 20, "delay": 10, "jitter": 0, "loss": 0.01}),
    Cell("rtt300", "tun", {"rate": 20, "delay": 150, "jitter": 20, "loss": 0}),
    Cell("sigstop", "kernel", {"up": 10, "down": 10, "up_q": 500, "down_q": 500}, stop_s=8.0),
)}


# ----------------------------------------------------------------------------------- one rank

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
                want = sum(((base * (r + 1)) % 997) for r in range(world)).astype(np.float32)
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


# ----------------------------------------------------------------------------------- one run

def _world(cell: Cell, world: int = WORLD) -> Any:
    if cell.kind == "kernel":
        from commlayer.wan.kernel import AccessLink, KernelWorld

        p = cell.params
        return KernelWorld([AccessLink(p["up"], p["down"], p["up_q"], p["down_q"])] * world, prefix=PREFIX)
    from commlayer.wan.matrix import uniform_matrix
    from commlayer.wan.netns import NetnsWorld
    from commlayer.wan.spec import LinkSpec

    p = cell.params
    spec = LinkSpec(delay_ms=p["delay"], rate_mbit=p["rate"], jitter_ms=p["jitter"], loss=p["loss"], queue_ms=500.0)
    return NetnsWorld(uniform_matrix(cell.name, world, spec), seed=int(time.time()), prefix=PREFIX)


def _env(w: Any, rank: int, world: int) -> dict[str, str]:
    if hasattr(w, "env"):
        return w.env(rank)
    from commlayer.wan.world import NETNS_COMMLAYER_PORT, NETNS_MASTER_PORT, _torchrun_env

    return {**_torchrun_env(rank, world, w.addresses[0], NETNS_MASTER_PORT), "COMMLAYER_HOST": w.addresses[rank],
            "COMMLAYER_PORT": str(NETNS_COMMLAYER_PORT), "GLOO_SOCKET_IFNAME": "wan0", "TP_SOCKET_IFNAME": "wan0"}


def run_once(cell: Cell, backend: str, workload: str, sizes: list[float], steps: int, timeout_s: float,
             extra_env: dict[str, str] | None = None, world: int = WORLD) -> dict[str, Any]:
    """One run of ``workload`` with ``backend`` on a fresh world of ``cell``; per-rank results."""
    t_start = time.monotonic()
    with _world(cell, world) as w:
        procs = []
        for r in range(world):
            env = {**os.environ, **_env(w, r, world), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(extra_env or {})}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", backend, "--workloads", workload,
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


def failure_once(kind: str, world: int = 3, victim: int = 2, timeout_s: float = 60.0) -> dict[str, Any]:
    """A real failure of rank ``victim`` while every rank loops small all_reduces (zmq backend).

    ``kind``: "local-kill" (SIGKILL, all ranks on this machine: ipc and shared memory), "remote-kill"
    (SIGKILL, every rank in its own namespace: FIN/RST over TCP) or "cut" (the victim's link is
    unplugged: no FIN, no RST). Detection is measured from the moment the victim is dead (its pidfd
    became readable) or its link was cut, to each survivor's exception (``time.monotonic`` is
    system-wide).
    """
    from commlayer.wan.kernel import AccessLink, KernelWorld

    w = None if kind == "local-kill" else KernelWorld([AccessLink(100, 100, 50, 50)] * world, prefix=PREFIX)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "zmq", "--workloads", "loop", "--timeout", str(timeout_s)]
    port = str(29700 + os.getpid() % 200)
    procs = []
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
            w.cut(victim)
            t_fail = time.monotonic()
        else:
            pidfd = os.pidfd_open(procs[victim].pid)
            os.kill(procs[victim].pid, signal.SIGKILL)
            import select

            select.select([pidfd], [], [], 10.0)
            t_fail = time.monotonic()
            os.close(pidfd)
        res = {}
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


def _summary(runs: list[dict[str, Any]], ref: list[dict[str, Any]] | None) -> dict[str, Any]:
    deaths = sum(any(r["error"] for r in run["ranks"]) for run in runs)
    keys = sorted({k for run in runs for r in run["ranks"] for k in r["times"]})
    times = {k: statistics.median([max(r["times"].get(k, float("nan")) for r in run["ranks"]) for run in runs]) for k in keys}
    rss = statistics.median([max((r["rss_mib"] or 0) for r in run["ranks"]) for run in runs])
    exact = []
    for i, run in enumerate(runs):
        if run["workload"] == "allreduce":
            exact.append(all(r["exact"] for r in run["ranks"]))
        else:
            params = [r.get("params") for r in run["ranks"]]
            same = all(p is not None and p == params[0] for p in params)
            if same and ref is not None and i < len(ref) and ref[i]["ranks"][0].get("params"):
                g = ref[i]["ranks"][0]["params"]
                same = max(abs(a - b) for a, b in zip(params[0], g)) <= 1e-5
            exact.append(same)
    errors = sorted({r["error"][:200] for run in runs for r in run["ranks"] if r["error"]})
    return {"runs": len(runs), "false_deaths": deaths, "exact_runs": sum(exact), "median_time_s": times,
            "median_peak_rss_mib": round(rss, 1), "errors": errors[:5]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per cell, workload and backend (the issue asks 20)")
    ap.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated, from {list(CELLS)}")
    ap.add_argument("--workloads", default="allreduce,ddp")
    ap.add_argument("--backends", default="zmq,gloo")
    ap.add_argument("--sizes", default="2,8", help="all_reduce sizes in MiB")
    ap.add_argument("--steps", type=int, default=30, help="DDP steps")
    ap.add_argument("--timeout", type=float, default=300.0, help="process-group timeout, s")
    ap.add_argument("--json", default="", help="write every run's results here")
    ap.add_argument("--failures", type=int, default=0, help="instead of the matrix: N runs of each real failure "
                    "(local SIGKILL, remote SIGKILL, link cut); reports detection medians")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    sizes = [float(s) for s in a.sizes.split(",") if s]
    if a.worker:
        print(json.dumps(worker(a.worker, a.workloads, sizes, a.steps, a.timeout)), flush=True)
        return 0
    print(f"# {platform.node()}: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, memcpy {_memcpy_gbs():.1f} GB/s")
    if a.failures:
        out: dict[str, Any] = {}
        for kind in ("local-kill", "remote-kill", "cut"):
            runs = [failure_once(kind) for _ in range(a.failures)]
            for r in runs:
                print(kind, json.dumps(r)[:400], flush=True)
            d = [x for r in runs for x in (r.get("detect_s") or {}).values() if x is not None]
            out[kind] = {"runs": runs, "median_detect_s": statistics.median(d) if d else None, "worst_detect_s": max(d, default=None),
                         "named": sum(bool(r.get("named")) for r in runs)}
            print(f"== {kind}: detection median {out[kind]['median_detect_s']}, worst {out[kind]['worst_detect_s']}, "
                  f"error names the victim in {out[kind]['named']}/{len(runs)} runs", flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=1))
        return 0
    results: dict[str, Any] = {}
    for cname in a.cells.split(","):
        cell = CELLS[cname]
        for wl in a.workloads.split(","):
            runs: dict[str, list[dict[str, Any]]] = {b: [] for b in a.backends.split(",")}
            for i in range(a.runs):
                for b in runs:  # interleaved, so both backends see the same machine load
                    run = run_once(cell, b, wl, sizes, a.steps, a.timeout)
                    runs[b].append(run)
                    bad = [r["error"] for r in run["ranks"] if r["error"]]
                    print(f"{cname:8s} {wl:9s} {b:4s} run {i + 1}: wall {run['wall_s']:.0f} s, "
                          f"{'OK' if not bad else 'FAILED: ' + bad[0][:160]}", flush=True)
            ref = runs.get("gloo")
            for b, rr in runs.items():
                s = _summary(rr, ref if b != "gloo" else None)
                results[f"{cname}/{wl}/{b}"] = {**s, "raw": rr}
                print(f"== {cname}/{wl}/{b}: false deaths {s['false_deaths']}/{s['runs']}, exact {s['exact_runs']}/{s['runs']}, "
                      f"median time {json.dumps({k: round(v, 2) for k, v in s['median_time_s'].items()})}, "
                      f"peak RSS {s['median_peak_rss_mib']} MiB", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


def _memcpy_gbs() -> float:
    import numpy as np

    src = np.ones(64 << 20, dtype=np.uint8)
    dst = np.empty_like(src)
    t0 = time.perf_counter()
    for _ in range(5):
        np.copyto(dst, src)
    return 5 * src.nbytes / (time.perf_counter() - t0) / 1e9


if __name__ == "__main__":
    sys.exit(main())
