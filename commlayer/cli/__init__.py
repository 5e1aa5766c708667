"""``commlayer`` command line: launch, bench, probe, demo, simulate.

    commlayer launch --nproc 4 --links wan-20mbit-50ms [--mode relay|netns] train.py [args...]
    commlayer bench  --nproc 4 --links datacenter,wan-20mbit-50ms --algos ring,tree --codecs ,int8
    commlayer probe  --nproc 4 --links hetero
    commlayer demo   [--quick]
    commlayer simulate --nodes 1024 --topology ring,tree,ps,gossip:exponential --links lte [--validate]

Every sub-command lives in its own module and is imported only when used.
"""

from __future__ import annotations

import argparse
import logging
import sys

from commlayer.cli._common import CliError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    from commlayer.cli import bench, demo, launch, probe, simulate

    ap = argparse.ArgumentParser(prog="commlayer", description="commlayer: distributed training over slow, far-apart links")
    ap.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod in (launch, bench, probe, demo, simulate):
        mod.add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``commlayer`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"commlayer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
