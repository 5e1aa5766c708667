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
The runs themselves are :mod:`commlayer.testing.liveness` (shared with ``tests/test_liveness*.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from commlayer.testing.machine import memcpy_gbps
from commlayer.testing.liveness import Cell, failure_once, run_once

CELLS = {c.name: c for c in (
    Cell("bloat2m", "kernel", {"up": 2, "down": 2, "up_q": 3000, "down_q": 3000}),
    Cell("asym", "kernel", {"up": 1, "down": 10, "up_q": 1000, "down_q": 100}),
    Cell("loss1", "tun", {"rate": 20, "delay": 10, "jitter": 0, "loss": 0.01}),
    Cell("rtt300", "tun", {"rate": 20, "delay": 150, "jitter": 20, "loss": 0}),
    Cell("sigstop", "kernel", {"up": 10, "down": 10, "up_q": 500, "down_q": 500}, stop_s=8.0),
)}


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
    a = ap.parse_args(argv)
    sizes = [float(s) for s in a.sizes.split(",") if s]
    print(f"# {platform.node()}: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, memcpy {memcpy_gbps():.1f} GB/s")
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


if __name__ == "__main__":
    sys.exit(main())
