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
    python benchmarks/liveness.py --cells bloat2m --workloads allreduce --sizes 2 --runs 5 \
        --backends 'zmq,zmq:COMMLAYER_ALGO=ring,gloo' --load 2 --prefix livez

A backend may carry environment settings for its ranks (``zmq:COMMLAYER_ALGO=ring;COMMLAYER_CHUNK_BYTES=65536``);
each such variant is reported on its own, with its ratio to gloo. ``--load N`` runs N CPU-bound processes
beside the matrix (each bounded in time, stopped at the end). The zmq runs record the planner's plans
(``COMMLAYER_METRICS``, rank 0) in their raw results.

Figures are medians over runs; a "false death" is any rank of a run raising (no rank is killed).
The runs themselves are :mod:`commlayer.testing.liveness` (shared with ``tests/test_liveness*.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from commlayer.testing.machine import machine_line
from commlayer.testing.liveness import PREFIX, Cell, failure_once, run_once

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
    ok = [run for run in runs if not any(r["error"] for r in run["ranks"])]  # a failed run has no time to compare
    times = {k: statistics.median([max(r["times"][k] for r in run["ranks"]) for run in ok]) for k in keys if ok}
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
    return {"runs": len(runs), "false_deaths": deaths, "timed_runs": len(ok), "exact_runs": sum(exact), "median_time_s": times,
            "median_peak_rss_mib": round(rss, 1), "errors": errors[:5]}


def _variant(spec: str) -> tuple[str, dict[str, str]]:
    """``"zmq:K=V;K2=V2"`` -> ("zmq", {"K": "V", "K2": "V2"})."""
    backend, _, rest = spec.partition(":")
    env = dict(kv.split("=", 1) for kv in rest.split(";") if kv)
    if backend not in ("zmq", "gloo") or any(not k.startswith("COMMLAYER_") for k in env):
        raise SystemExit(f"Expected a backend like zmq or zmq:COMMLAYER_ALGO=ring, got {spec!r}")
    return backend, env


def _plans(path: Path) -> list[dict[str, Any]]:
    """The planner's "plan" events of one rank's metrics file (empty when it wrote none)."""
    if not path.exists():
        return []
    events = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [{k: e.get(k) for k in ("nbytes", "algo", "chunk_bytes", "predicted_s", "reason")} for e in events if e.get("event") == "plan"]


def _burners(n: int, max_s: float) -> list[subprocess.Popen[bytes]]:
    """N CPU-bound processes, each ending by itself after ``max_s`` seconds."""
    code = f"import time\nend = time.monotonic() + {max_s}\nwhile time.monotonic() < end:\n    pass\n"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]


def _matrix(a: argparse.Namespace, sizes: list[float], variants: dict[str, tuple[str, dict[str, str]]]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for cname in a.cells.split(","):
        cell = CELLS[cname]
        for wl in a.workloads.split(","):
            runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
            for i in range(a.runs):
                for v, (backend, env) in variants.items():  # interleaved, so every variant sees the same machine load
                    with tempfile.TemporaryDirectory(prefix="liveness-metrics-") as tmp:
                        if backend == "zmq":
                            env = {**env, "COMMLAYER_METRICS": str(Path(tmp) / "rank{rank}.jsonl")}
                        load = os.getloadavg()[0]
                        run = run_once(cell, backend, wl, sizes, a.steps, a.timeout, extra_env=env, prefix=a.prefix)
                        run.update(variant=v, load_before=load, plans=_plans(Path(tmp) / "rank0.jsonl"))
                    runs[v].append(run)
                    bad = [r["error"] for r in run["ranks"] if r["error"]]
                    plan = ", ".join(f"{p['algo']}/{(p['chunk_bytes'] or 0) >> 10}K" for p in run["plans"])
                    times = {k: round(max(r["times"].get(k, float("nan")) for r in run["ranks"]), 2)
                             for k in sorted({k for r in run["ranks"] for k in r["times"]})}
                    print(f"{cname:8s} {wl:9s} {v} run {i + 1}: wall {run['wall_s']:.0f} s, load {load:.1f}, times {json.dumps(times)}"
                          f"{', plan ' + plan if plan else ''}, {'OK' if not bad else 'FAILED: ' + bad[0][:160]}", flush=True)
            ref = runs.get("gloo")
            gloo = _summary(ref, None)["median_time_s"] if ref else {}
            for v, rr in runs.items():
                s = _summary(rr, ref if v != "gloo" else None)
                ratio = {k: round(t / gloo[k], 3) for k, t in s["median_time_s"].items() if gloo.get(k)}
                results[f"{cname}/{wl}/{v}"] = {**s, "ratio_to_gloo": ratio, "raw": rr}
                print(f"== {cname}/{wl}/{v}: false deaths {s['false_deaths']}/{s['runs']}, exact {s['exact_runs']}/{s['runs']}, "
                      f"median time over {s['timed_runs']} OK runs {json.dumps({k: round(t, 2) for k, t in s['median_time_s'].items()})}, "
                      f"/gloo {json.dumps(ratio)}, peak RSS {s['median_peak_rss_mib']} MiB", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per cell, workload and backend (the issue asks 20)")
    ap.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated, from {list(CELLS)}")
    ap.add_argument("--workloads", default="allreduce,ddp")
    ap.add_argument("--backends", default="zmq,gloo", help="comma-separated; zmq:COMMLAYER_X=v;COMMLAYER_Y=w adds settings")
    ap.add_argument("--sizes", default="2,8", help="all_reduce sizes in MiB")
    ap.add_argument("--steps", type=int, default=30, help="DDP steps")
    ap.add_argument("--timeout", type=float, default=300.0, help="process-group timeout, s")
    ap.add_argument("--json", default="", help="write every run's results here")
    ap.add_argument("--prefix", default=PREFIX, help="start of namespace/veth names (<= 6 chars; keep it unique to you)")
    ap.add_argument("--load", type=int, default=0, help="CPU-bound processes to run beside the matrix")
    ap.add_argument("--load-max-s", type=float, default=7200.0, help="each load process ends by itself after this")
    ap.add_argument("--failures", type=int, default=0, help="instead of the matrix: N runs of each real failure "
                    "(local SIGKILL, remote SIGKILL, link cut); reports detection medians")
    a = ap.parse_args(argv)
    sizes = [float(s) for s in a.sizes.split(",") if s]
    print(f"# {platform.node()}: {machine_line()}", flush=True)
    if a.failures:
        out: dict[str, Any] = {}
        for kind in ("local-kill", "remote-kill", "cut"):
            runs = [failure_once(kind, prefix=a.prefix) for _ in range(a.failures)]
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
    variants = {spec: _variant(spec) for spec in a.backends.split(",")}
    burners = _burners(a.load, a.load_max_s) if a.load else []
    try:
        results = _matrix(a, sizes, variants)
    finally:
        for b in burners:
            b.kill()
            b.wait(timeout=10)
    print(f"# load average at the end {os.getloadavg()[0]:.1f} ({a.load} load processes of ours)", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
