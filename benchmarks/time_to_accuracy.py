"""Time-to-accuracy: gloo dense vs PowerSGD-over-gloo vs commlayer, 4 ranks on emulated links.

Same model (MLP, ~1.3 M parameters = 5.3 MB of float32 gradients), same data and seed for every
configuration. Runs in netns mode (root): every rank in its own network namespace behind the
emulated link, so gloo and commlayer's zmq transport cross identical links. Every configuration
trains the same number of steps; time to target = training time (evaluation excluded) until the
eval loss first reaches the target (checked every 4 steps, and at synchronizations for DiLoCo /
local SGD, i.e. an upper bound for them). Bytes = all ranks' bytes on the emulated links.
Reports medians over repeats (dense gloo, the slowest, is repeated ``--dense-repeats`` times).

    python benchmarks/time_to_accuracy.py                       # wan-20mbit-50ms and datacenter
    python benchmarks/time_to_accuracy.py --profiles wan-20mbit-50ms --repeats 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from commlayer.demo.report import format_table, plot, summarize
from commlayer.demo.runner import pick_mode, run_world

DENSE = "gloo:dense"
OTHERS = ["gloo:torch-powersgd:2", "zmq:hook:powersgd:rank=2+ef", "zmq:local:16", "zmq:diloco:16", "zmq:diloco:16@int8+ef",
          "zmq:diloco:32"]


def _run(profile: str, mode: str, configs: list[str], repeats: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    t0 = time.monotonic()

    def ev(event: str, d: dict[str, Any]) -> None:
        if event in ("start", "end"):
            print(f"  [{time.monotonic() - t0:5.0f}s] {profile} {d['config']} {event}", flush=True)

    wargs = ["--configs", ";".join(configs), "--max-steps", str(args.steps), "--target-loss", str(args.target_loss),
             "--eval-every", "4", "--repeats", str(repeats)]
    res = run_world(args.nproc, profile, mode, "commlayer.demo.worker", wargs, timeout_s=args.timeout, on_event=ev)
    if any(res.returncodes):
        print("\n".join(res.tail[-30:]), file=sys.stderr)
        raise SystemExit(f"{profile}: ranks exited with {res.returncodes}")
    for r in res.results:
        r["profile"] = profile
    return res.results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", default="wan-20mbit-50ms,datacenter")
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--configs", default=";".join(OTHERS), help="';'-separated configurations beside gloo:dense")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--target-loss", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dense-repeats", type=int, default=1)
    ap.add_argument("--mode", choices=["relay", "netns"], default=None)
    ap.add_argument("--json", default="results/time_to_accuracy.json")
    ap.add_argument("--png", default="results/time_to_accuracy.png")
    ap.add_argument("--timeout", type=float, default=1500.0)
    args = ap.parse_args(argv)
    mode, note = pick_mode(args.mode)
    if note:
        print(f"note: {note}")
    others = [c for c in args.configs.split(";") if c.strip()]
    if mode == "relay":
        others = [c for c in others if not c.startswith("gloo")]
    doc: dict[str, Any] = {"mode": mode, "nproc": args.nproc, "steps": args.steps, "target_loss": args.target_loss, "profiles": {}}
    for profile in [p for p in args.profiles.split(",") if p]:
        print(f"# {profile}: {args.nproc} ranks, {mode} mode, {args.steps} steps, target eval loss {args.target_loss}", flush=True)
        runs = _run(profile, mode, [DENSE if mode == "netns" else "zmq:dense"], args.dense_repeats, args)
        runs += _run(profile, mode, others, args.repeats, args)
        rows = summarize(runs)
        print(format_table(rows, rows[0]["config"]), flush=True)
        doc["profiles"][profile] = {"rows": rows, "runs": runs}
        if args.png:
            Path(args.png).parent.mkdir(parents=True, exist_ok=True)
            png = args.png.replace(".png", f"_{profile}.png")
            plot(runs, png, f"time to accuracy, {args.nproc} ranks, {profile} ({mode})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
