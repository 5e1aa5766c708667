"""``commlayer launch``: N local ranks of an unmodified torchrun script over emulated links."""

from __future__ import annotations

import argparse
import os

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
    p.add_argument("script", help="Python script to run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the script")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from commlayer.wan import launch, netns_unavailable_reason

    check_nproc(args.nproc)
    links = check_links(args.links, args.nproc)
    if not os.path.isfile(args.script):
        raise CliError(f"script {args.script!r} not found; give the path of a Python file")
    if args.mode == "netns":
        reason = netns_unavailable_reason()
        if reason:
            raise CliError(f"--mode netns: {reason}; use --mode relay (shapes commlayer's zmq transport only)")
    rest = args.args[1:] if args.args[:1] == ["--"] else args.args
    return launch(args.nproc, links, args.script, rest, mode=args.mode, timeout_s=args.timeout, seed=args.seed)
