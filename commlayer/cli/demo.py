"""``commlayer demo``: dense gloo vs PowerSGD-over-gloo vs commlayer on an emulated WAN, 4 ranks.

Trains the same MLP (~1.3 M parameters, synthetic data, same seed) with each configuration over
the default profile wan-20mbit-50ms, prints progress, then a table (time per step, bytes on the
wire per step, time to the target loss, final loss/accuracy, speed-up over dense gloo) and writes
a time-to-accuracy plot. netns mode (root) shapes gloo and commlayer identically; without root the
demo explains why and compares commlayer configurations only (dense zmq as the baseline).
Each configuration trains until it reaches the target loss or its time budget runs out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from commlayer.cli._common import CliError, check_links, check_nproc

#: commlayer's best configuration on wan-20mbit-50ms, chosen by benchmarks/time_to_accuracy.py.
BEST = "zmq:diloco:16@int8+ef"
TARGET_LOSS = 0.5
QUICK_TASK = {"in_dim": 32, "hidden": 64, "train": 2048, "eval": 512, "batch": 32, "separation": 0.6, "lr": 0.1}


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("demo", help="train a small model with gloo, PowerSGD and commlayer on an emulated WAN",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--links", default="wan-20mbit-50ms", help="profile or link-matrix file (default %(default)s)")
    p.add_argument("--mode", choices=["relay", "netns"], default=None, help="default: netns when root, else relay")
    p.add_argument("--configs", default="", help="';'-separated BACKEND:METHOD[:ARG] (default: dense gloo, torch "
                   f"PowerSGD over gloo, {BEST})")
    p.add_argument("--budget-s", type=float, default=45.0, help="training-time budget per configuration (s)")
    p.add_argument("--max-steps", type=int, default=160)
    p.add_argument("--target-loss", type=float, default=TARGET_LOSS)
    p.add_argument("--png", default="commlayer_demo.png")
    p.add_argument("--json", default="", help="also write the raw results here")
    p.add_argument("--quick", action="store_true", help="tiny model and few steps (a smoke test, ~20 s)")
    p.add_argument("--timeout", type=float, default=900.0)
    p.set_defaults(func=run)


def _default_configs(mode: str) -> list[str]:
    if mode == "netns":
        return ["gloo:dense", "gloo:torch-powersgd:2", BEST]
    return ["zmq:dense", "zmq:hook:powersgd:rank=2+ef", BEST]


def run(args: argparse.Namespace) -> int:
    from commlayer.demo.configs import parse_config
    from commlayer.demo.report import format_table, plot, summarize
    from commlayer.demo.runner import pick_mode, run_world

    check_nproc(args.nproc)
    if args.nproc < 2:
        raise CliError(f"--nproc: expected >= 2, got {args.nproc}")
    links = check_links(args.links, args.nproc)
    try:
        mode, note = pick_mode(args.mode)
    except RuntimeError as exc:
        raise CliError(str(exc)) from None
    if note:
        print(f"note: {note}", flush=True)
    configs = [c for c in args.configs.split(";") if c.strip()] or _default_configs(mode)
    try:
        parsed = [parse_config(c) for c in configs]
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if mode == "relay" and any(c.backend == "gloo" for c in parsed):
        print("warning: relay mode does not shape gloo; gloo configurations run on plain loopback", flush=True)
    task: dict[str, Any] = dict(QUICK_TASK) if args.quick else {}
    steps, budget, every = (8, 10.0, 4) if args.quick else (args.max_steps, args.budget_s, 4)
    target = 2.0 if args.quick else args.target_loss
    print(f"commlayer demo: {args.nproc} ranks on {links.name} ({mode} mode); configurations: {', '.join(configs)}", flush=True)
    print(f"each trains until eval loss <= {target} or {budget:.0f} s of training time; starting ranks ...", flush=True)
    t0 = time.monotonic()

    def on_event(event: str, d: dict[str, Any]) -> None:
        el = time.monotonic() - t0
        if event == "start":
            print(f"[{el:5.0f}s] {d['config']}: training", flush=True)
        elif event == "eval":
            print(f"[{el:5.0f}s] {d['config']}: step {d['step']:>4}  train time {d['time_s']:6.1f}s  "
                  f"loss {d['loss']:.3f}  acc {d['acc']:.1f}%", flush=True)
        elif event == "end":
            print(f"[{el:5.0f}s] {d['config']}: done, {d['bytes_sent'] / 1e6:.1f} MB on the wire", flush=True)

    wargs = ["--configs", ";".join(configs), "--task", json.dumps(task), "--max-steps", str(steps), "--budget-s", str(budget),
             "--target-loss", str(target), "--stop-at-target", "--eval-every", str(every)]
    res = run_world(args.nproc, links, mode, "commlayer.demo.worker", wargs, timeout_s=args.timeout, on_event=on_event)
    if any(res.returncodes) or not res.results:
        print("\n".join(res.tail[-25:]))
        raise CliError(f"training ranks exited with {res.returncodes}")
    rows = summarize(res.results)
    print(f"\n{args.nproc} ranks, {links.name}, {mode} mode; target eval loss {target}; time = training time "
          "(evaluation excluded); MB/step = bytes all ranks put on the emulated links per step")
    print(format_table(rows, configs[0]))
    if args.json:
        Path(args.json).write_text(json.dumps({"mode": mode, "links": links.name, "rows": rows, "runs": res.results}, indent=1))
    written, note = plot(res.results, args.png, f"time to accuracy, {args.nproc} ranks, {links.name} ({mode})")
    if note:
        print(f"note: {note}")
    print(f"wrote {written}")
    return 0
