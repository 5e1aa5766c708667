"""Bandwidth-adaptive training: an unmodified DDP script on ``COMMLAYER_CODEC=auto`` against gloo.

Same demo task, model, data and seed for every configuration (the demo's worker,
:mod:`commlayer.demo.worker`, run by :mod:`commlayer.demo.runner` on emulated links, as
``benchmarks/time_to_accuracy.py`` does), 4 ranks, every rank in its own network namespace
(netns mode, root) so gloo and the zmq transport cross identical links:

* ``gloo:dense``: DDP over gloo;
* ``gloo:torch-powersgd:R``: DDP over gloo with torch's PowerSGD hook;
* ``auto``: the same DDP script as ``zmq:dense`` (no hook, no code change), with
  ``COMMLAYER_CODEC=auto`` in the environment: the controller picks each bucket's codec.

Time to target = training time until the eval loss first reaches ``--target-loss`` (evaluation
excluded); a configuration stopped by ``--budget-s`` before reaching it gives a lower bound of
the speed-up (">="). Medians over ``--repeats``. The controller's choices (``auto_plan`` events,
``COMMLAYER_METRICS``) are printed per bucket with the reason; ``auto_step`` events give bytes per
step and compute utilization. The machine line (cores, load, memcpy) is printed before and after.

Every repeat is a fresh world (new namespaces, new processes) running each configuration once, so
``auto``'s controller re-probes, re-measures and starts without error-feedback residuals in each
repeat, and load changes over the run hit every configuration alike.

    python benchmarks/adaptive_training.py                                  # all four profiles
    python benchmarks/adaptive_training.py --profiles wan-20mbit-50ms --repeats 1 --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from commlayer.adapt.metrics import read_jsonl
from commlayer.demo.report import format_table, summarize
from commlayer.demo.runner import pick_mode, run_world
from commlayer.testing.machine import machine_line

#: A home uplink of 2 Mbit/s behind a 2 s modem queue (bufferbloat), 20 Mbit/s down.
BLOATED_2MBIT = {"name": "bloated-2mbit-uplink", "core_delay_ms": 10.0, "devices": ["bloated-2mbit"],
                 "device_classes": {"bloated-2mbit": {"up_mbit": 2.0, "down_mbit": 20.0, "access_delay_ms": 15.0,
                                                      "queue_ms": 2000.0}}}
PROFILES = {"wan-20mbit-50ms": "wan-20mbit-50ms", "home-broadband": "home-broadband", "bloated-2mbit": BLOATED_2MBIT,
            "datacenter": "datacenter"}


def _run(profile: str, mode: str, configs: list[str], args: argparse.Namespace, auto: bool, rep: int) -> list[dict[str, Any]]:
    t0 = time.monotonic()

    def ev(event: str, d: dict[str, Any]) -> None:
        if event in ("start", "end"):
            print(f"  [{time.monotonic() - t0:5.0f}s] {profile} {'auto' if auto else d['config']} {event}", flush=True)

    metrics = str(Path(args.out).parent / f"adaptive_{profile}_r{rep}_{{rank}}.jsonl")
    saved = {k: os.environ.get(k) for k in ("COMMLAYER_CODEC", "COMMLAYER_METRICS")}
    if auto:  # the environment is the only change: the worker's DDP code is the same as zmq:dense's
        os.environ.update({"COMMLAYER_CODEC": "auto", "COMMLAYER_METRICS": metrics})
        Path(metrics.format(rank=0)).unlink(missing_ok=True)
    wargs = ["--configs", ";".join(configs), "--max-steps", str(args.steps), "--target-loss", str(args.target_loss),
             "--eval-every", "4", "--repeats", "1", "--budget-s", str(args.budget_s), "--task", args.task]
    try:
        res = run_world(args.nproc, PROFILES[profile], mode, "commlayer.demo.worker", wargs, timeout_s=args.timeout, on_event=ev)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if any(res.returncodes):
        print("\n".join(res.tail[-30:]), file=sys.stderr)
        raise SystemExit(f"{profile}: ranks exited with {res.returncodes}")
    for r in res.results:
        r["profile"], r["repeat"] = profile, rep
        if auto:
            r["config"], r["label"] = "zmq:auto", "commlayer zmq, COMMLAYER_CODEC=auto, unmodified DDP"
            r["controller"] = _controller(metrics.format(rank=0))
    return res.results


def _controller(path: str) -> dict[str, Any]:
    """Rank 0's decisions (latest per bucket) and step statistics from the metrics file."""
    if not os.path.exists(path):
        return {"decisions": [], "steps": 0}
    events = read_jsonl(path)
    plans = [e for e in events if e["event"] == "auto_plan"]
    latest = {e["bucket"]: e for e in plans}
    history: dict[int, list[str]] = {}
    for e in plans:
        history.setdefault(e["bucket"], []).append(e["codec"] or "exact")
    flips = sum(1 for h in history.values() for a, b in zip(h, h[1:]) if a != b)
    steps = [e for e in events if e["event"] == "auto_step"][2:]  # skip the measuring steps
    util = [e["utilization"] for e in steps if e.get("utilization") is not None]
    return {"decisions": [latest[k] for k in sorted(latest)], "steps": len(steps),
            "wire_bytes_per_step": statistics.median(e["wire_bytes"] for e in steps) if steps else None,
            "utilization": statistics.median(util) if util else None,
            "replans": sum(1 for e in events if e["event"] == "replan"), "flips": flips,
            "history": {str(k): v for k, v in history.items()}}


def controller_table(ctl: dict[str, Any]) -> str:
    """One line per bucket: codec, predicted vs exact, error, why; then bytes per step and utilization."""
    lines = [f"{'bucket':>6} {'MB':>7} {'codec':<22}{'pred ms':>9}{'exact ms':>10}{'error':>8}  why"]
    for d in ctl["decisions"]:
        lines.append(f"{d['bucket']:>6} {d['nbytes'] / 1e6:>7.2f} {(d['codec'] or 'exact'):<22}{d['predicted_s'] * 1e3:>9.1f}"
                     f"{d['exact_predicted_s'] * 1e3:>10.1f}{d['rel_error']:>8.3f}  {d['reason'][:110]}")
    wb, ut = ctl.get("wire_bytes_per_step"), ctl.get("utilization")
    lines.append(f"wire bytes per step (rank 0, payload): {wb / 1e6:.3f} MB" if wb is not None else "wire bytes per step: n/a")
    lines.append(f"compute utilization (compute / step period, median): {ut:.1%}" if ut is not None else "utilization: n/a")
    lines.append(f"link re-probes: {ctl.get('replans', 0)}; codec changes after the first plan: {ctl.get('flips', 0)}; "
                 f"plans per bucket: {ctl.get('history', {})}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", default=",".join(PROFILES))
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--target-loss", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=300.0, help="training seconds per configuration at most")
    ap.add_argument("--task", default="{}", help="TaskConfig fields as JSON (e.g. a larger model: '{\"hidden\": 2048}')")
    ap.add_argument("--powersgd-rank", type=int, default=2)
    ap.add_argument("--mode", choices=["relay", "netns"], default=None)
    ap.add_argument("--auto-only", action="store_true", help="run only the auto configuration (no gloo peers: not a comparison)")
    ap.add_argument("--out", default="results/adaptive_training.json")
    ap.add_argument("--timeout", type=float, default=3000.0)
    args = ap.parse_args(argv)
    mode, note = pick_mode(args.mode)
    if note:
        print(f"note: {note}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    mach = {"start": machine_line(), "loadavg_start": os.getloadavg()}
    print(f"# machine: {mach['start']}", flush=True)
    base = ["gloo:dense", f"gloo:torch-powersgd:{args.powersgd_rank}"] if mode == "netns" else ["zmq:dense"]
    doc: dict[str, Any] = {"mode": mode, "nproc": args.nproc, "steps": args.steps, "target_loss": args.target_loss,
                           "task": json.loads(args.task), "machine": mach, "profiles": {}}
    for profile in [p for p in args.profiles.split(",") if p]:
        print(f"# {profile}: {args.nproc} ranks, {mode} mode, {args.steps} steps, target eval loss {args.target_loss}", flush=True)
        runs: list[dict[str, Any]] = []
        for rep in range(args.repeats):
            if not args.auto_only:
                runs += _run(profile, mode, base, args, auto=False, rep=rep)
            runs += _run(profile, mode, ["zmq:dense"], args, auto=True, rep=rep)
        rows = summarize(runs)
        print(format_table(rows, rows[0]["config"]), flush=True)
        for r in (r for r in runs if r["config"] == "zmq:auto"):
            print(f"auto, repeat {r['repeat']}:\n{controller_table(r['controller'])}", flush=True)
        doc["profiles"][profile] = {"rows": rows, "runs": runs}
        Path(args.out).write_text(json.dumps(doc, indent=1, default=str))
    mach.update(end=machine_line(), loadavg_end=os.getloadavg())
    print(f"# machine at the end: {mach['end']}")
    Path(args.out).write_text(json.dumps(doc, indent=1, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
