"""Delayed sync on emulated links: torch post-local SGD over gloo vs streaming compressed DiLoCo over zmq.

4 ranks, each in its own network namespace behind the emulated link (netns mode, root), so gloo
and commlayer's zmq transport cross identical links. Same model, data and seed as the demo
(MLP, ~1.3 M parameters). Per profile, in one world run each:

* ``gloo:dense`` (baseline, ``--dense-repeats`` runs): DDP, fp32 gradients every step;
* ``gloo:postlocal:H``: torch's ``PostLocalSGDOptimizer`` + ``PeriodicModelAverager(period=H)``;
* ``zmq:stream:H:P:SPEC``: :class:`commlayer.sync.StreamingDiLoCo` (period ``H`` or ``auto``,
  ``P`` fragments, compressed outer pseudo-gradients).

Reported per configuration (medians over ``--repeats`` runs): time to the target eval loss
(training time, evaluation excluded, checked every ``--eval-every`` steps on rank 0's model),
final eval loss, bytes on the emulated links per training sample (all ranks, IP bytes),
compute utilization = compute-only step time (every rank training with no communication, at
the same time, before the configurations) / real step time, and the streaming sync's own figure
("in-sync": compute time / (compute + time inside ``sync.step()``), immune to the calibration's
noise under load); and the ratios the issue asks for.
``--load N`` repeats the non-dense configurations once more with ``N`` busy-loop processes
running beside the ranks. Prints the machine's memcpy bandwidth and core count.

    python benchmarks/delayed_sync.py                                   # 3 profiles, 3 repeats
    python benchmarks/delayed_sync.py --profiles wan-20mbit-50ms --repeats 1 --steps 48
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from commlayer.testing.machine import memcpy_gbps
from commlayer.demo.runner import run_world

ROOT = Path(__file__).resolve().parents[1]
DENSE = "gloo:dense"
OTHERS = "gloo:postlocal:16;zmq:stream:16:4:qsgd:levels=7+ef;zmq:stream:auto:4:qsgd:levels=7+ef"


def _burn(stop_at: float) -> None:
    x = 0
    while time.monotonic() < stop_at:
        x += 1


def _run(profile: str, configs: list[str], repeats: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    t0 = time.monotonic()

    def ev(event: str, d: dict[str, Any]) -> None:
        if event == "end":
            print(f"  [{time.monotonic() - t0:5.0f}s] {profile} {d['config']} {d['steps']} steps {d['time_s']:.1f}s", flush=True)

    wargs = ["--configs", ";".join(configs), "--max-steps", str(args.steps), "--target-loss", str(args.target_loss),
             "--eval-every", str(args.eval_every), "--repeats", str(repeats)]
    res = run_world(args.nproc, profile, "netns", "benchmarks.delayed_sync_worker", wargs, timeout_s=args.timeout, on_event=ev)
    if any(res.returncodes):
        print("\n".join(res.tail[-30:]), file=sys.stderr)
        raise SystemExit(f"{profile}: ranks exited with {res.returncodes}")
    return res.results


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians per configuration, in first-seen order."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["config"], []).append(r)
    rows = []
    for name, rs in by.items():
        hit = [r["reached"]["time_s"] for r in rs if r.get("reached")]
        med = statistics.median
        rows.append({"config": name, "label": rs[0]["label"], "runs": len(rs), "reached_runs": len(hit),
                     "time_to_target_s": med(hit) if len(hit) * 2 > len(rs) else None,
                     "elapsed_s": med(r["time_s"] for r in rs), "s_per_step": med(r["s_per_step"] for r in rs),
                     "final_loss": med(r["final_loss"] for r in rs),
                     "bytes_per_sample": med(r["bytes_sent"] / max(r["samples"], 1) for r in rs),
                     "utilization": med(r["compute_s_per_step"] / r["s_per_step"] for r in rs),
                     "sync_utilization": med(r["sync_utilization"] for r in rs) if "sync_utilization" in rs[0] else None,
                     "period_final": rs[0].get("period_final"),
                     "codec_state_bytes_per_rank": rs[0]["codec_state_bytes_per_rank"]})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'configuration':<50}{'s/step':>8}{'to target':>10}{'final':>7}{'B/sample':>10}{'util':>7}{'in-sync':>8}{'H':>5}"
             f"{'EF B/rank':>11}"]
    for r in rows:
        tt = f"{r['time_to_target_s']:.1f}s" if r["time_to_target_s"] is not None else f">{r['elapsed_s']:.0f}s"
        ef = max(r["codec_state_bytes_per_rank"]) if r["codec_state_bytes_per_rank"] else 0
        sync_util = f"{r['sync_utilization'] * 100:.0f}%" if r["sync_utilization"] is not None else "-"
        lines.append(f"{r['label'][:49]:<50}{r['s_per_step']:>8.3f}{tt:>10}{r['final_loss']:>7.3f}{r['bytes_per_sample']:>10.0f}"
                     f"{r['utilization'] * 100:>6.0f}%{sync_util:>8}{r['period_final'] or '':>5}{ef:>11}")
    return "\n".join(lines)


def ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Streaming rows against post-local SGD (time to target) and dense DDP (bytes per sample)."""
    dense = next((r for r in rows if r["config"] == DENSE), None)
    post = next((r for r in rows if ":postlocal:" in r["config"]), None)
    out = {}
    for r in rows:
        if ":stream:" not in r["config"]:
            continue
        d: dict[str, Any] = {"utilization": r["utilization"], "final_loss": r["final_loss"]}
        if post and post["time_to_target_s"] and r["time_to_target_s"]:
            d["speedup_vs_postlocal"] = post["time_to_target_s"] / r["time_to_target_s"]
        if post:
            d["final_loss_minus_postlocal"] = r["final_loss"] - post["final_loss"]
        if dense:
            d["bytes_fewer_than_dense"] = dense["bytes_per_sample"] / max(r["bytes_per_sample"], 1e-9)
            d["final_loss_minus_dense"] = r["final_loss"] - dense["final_loss"]
        out[r["config"]] = d
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", default="wan-20mbit-50ms,home-broadband,datacenter")
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--configs", default=OTHERS, help="';'-separated configurations beside gloo:dense")
    ap.add_argument("--steps", type=int, default=96)
    ap.add_argument("--target-loss", type=float, default=0.5)
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dense-repeats", type=int, default=1)
    ap.add_argument("--load", type=int, default=2, help="busy-loop processes for the run under load (0: skip it)")
    ap.add_argument("--json", default="results/delayed_sync.json")
    ap.add_argument("--timeout", type=float, default=3000.0)
    args = ap.parse_args(argv)
    os.chdir(ROOT)  # the ranks run `python -m benchmarks.delayed_sync_worker`
    print(f"machine: {os.cpu_count()} cores, memcpy {memcpy_gbps():.1f} GB/s; {args.nproc} ranks, netns mode, "
          f"{args.steps} steps, target eval loss {args.target_loss}", flush=True)
    others = [c for c in args.configs.split(";") if c.strip()]
    doc: dict[str, Any] = {"cores": os.cpu_count(), "memcpy_gbps": memcpy_gbps(), "args": vars(args), "profiles": {}}
    for profile in [p for p in args.profiles.split(",") if p]:
        print(f"# {profile}", flush=True)
        runs = _run(profile, [DENSE], args.dense_repeats, args) if args.dense_repeats else []
        runs += _run(profile, others, args.repeats, args)
        rows = summarize(runs)
        print(table(rows), flush=True)
        rat = ratios(rows)
        print(json.dumps(rat, indent=1), flush=True)
        entry: dict[str, Any] = {"rows": rows, "ratios": rat, "runs": runs}
        if args.load:
            print(f"# {profile}, under load ({args.load} busy-loop processes)", flush=True)
            stop_at = time.monotonic() + args.timeout
            burners = [mp.Process(target=_burn, args=(stop_at,), daemon=True) for _ in range(args.load)]
            for b in burners:
                b.start()
            try:
                loaded = _run(profile, others, 1, args)
            finally:
                for b in burners:
                    b.terminate()
                    b.join(5)
            lrows = summarize(loaded)
            print(table(lrows), flush=True)
            lrat = ratios(lrows + [r for r in rows if r["config"] == DENSE])
            print(json.dumps(lrat, indent=1), flush=True)
            entry.update({"loaded_rows": lrows, "loaded_ratios": lrat, "loaded_runs": loaded})
        doc["profiles"][profile] = entry
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(doc, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
