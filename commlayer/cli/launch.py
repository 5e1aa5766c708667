"""``commlayer launch``: N local ranks of an unmodified torchrun script over emulated links, or (``--fleet``) an
emulated elastic fleet whose devices join and leave on a schedule (:mod:`commlayer.fleet.schedule`)."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from commlayer.cli._common import CliError, check_links, check_nproc


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("launch", help="run N local ranks of a script on emulated links (torchrun's env vars)",
                       description="Starts N ranks of SCRIPT with the environment torchrun sets (RANK, WORLD_SIZE, "
                                   "MASTER_ADDR, ...), each behind emulated WAN links, so the same script runs "
                                   "unmodified under torchrun across real hosts. Exit code: the first failing rank's.")
    p.add_argument("--nproc", "--nproc-per-node", dest="nproc", type=int, required=True, help="number of ranks")
    p.add_argument("--links", default="wan-20mbit-50ms", help="profile name or link-matrix JSON file (default %(default)s)")
    p.add_argument("--mode", choices=["relay", "netns"], default="relay",
                   help="relay: shapes commlayer's transport only (no root); netns: every backend, gloo too (root)")
    p.add_argument("--timeout", type=float, default=None, help="kill all ranks after this many seconds (exit 124)")
    p.add_argument("--seed", type=int, default=0, help="seed of link jitter/loss")
    f = p.add_argument_group("fleet mode (--fleet): devices of commlayer.fleet.worker join and leave on a schedule")
    f.add_argument("--fleet", action="store_true", help="run an emulated elastic fleet instead of SCRIPT (docs/fleet.md)")
    f.add_argument("--rounds", type=int, default=50, help="fleet: rounds to train (default %(default)s)")
    f.add_argument("--churn-every", type=int, default=10,
                   help="fleet: every N rounds a random device leaves (clean or SIGKILL) and one joins (0: fixed; default %(default)s)")
    f.add_argument("--slow", type=int, default=0, help="fleet: devices that are --slow-factor x slower (default %(default)s)")
    f.add_argument("--slow-factor", type=float, default=5.0)
    f.add_argument("--step-sleep", type=float, default=0.01, help="fleet: seconds per local step of a device")
    f.add_argument("--workdir", default="", help="fleet: directory of the device logs (default: a temporary one)")
    p.add_argument("script", nargs="?", default="", help="Python script to run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the script")
    p.set_defaults(func=run)


def run_fleet(args: argparse.Namespace) -> int:
    """``--fleet``: runs the schedule, prints one JSON summary; exit 1 if an update was lost or applied twice."""
    from commlayer.fleet.schedule import Schedule, run as run_schedule

    if args.rounds < 1 or args.churn_every < 0 or not 0 <= args.slow < args.nproc:
        raise CliError(f"--fleet: expected --rounds >= 1, --churn-every >= 0 and 0 <= --slow < --nproc, got {args.rounds}, "
                       f"{args.churn_every} and {args.slow}")
    sched = Schedule(devices=args.nproc, rounds=args.rounds, churn_every=args.churn_every, slow=args.slow,
                     slow_factor=args.slow_factor, step_sleep=args.step_sleep, seed=args.seed)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="commlayer-fleet-"))
    out = run_schedule(sched, workdir, timeout=args.timeout or 1800.0)
    print(json.dumps({"workdir": str(workdir), **out.__dict__}, indent=1))
    return 0 if out.audit.get("lost") == 0 and out.audit.get("duplicated") == 0 else 1


def run(args: argparse.Namespace) -> int:
    from commlayer.wan import launch, netns_unavailable_reason

    check_nproc(args.nproc)
    if args.fleet:
        return run_fleet(args)
    if not args.script:
        raise CliError("expected SCRIPT (or --fleet for an emulated elastic fleet)")
    links = check_links(args.links, args.nproc)
    if not os.path.isfile(args.script):
        raise CliError(f"script {args.script!r} not found; give the path of a Python file")
    if args.mode == "netns":
        reason = netns_unavailable_reason()
        if reason:
            raise CliError(f"--mode netns: {reason}; use --mode relay (shapes commlayer's zmq transport only)")
    rest = args.args[1:] if args.args[:1] == ["--"] else args.args
    return launch(args.nproc, links, args.script, rest, mode=args.mode, timeout_s=args.timeout, seed=args.seed)
