"""Reliability runs of the zmq backend: kill injection, frame fuzzing, soak and timeouts (issue 7).

Every part runs real processes over real loopback sockets and is bounded in time. The small
versions run in CI (``tests/test_reliability*.py``); the full-size runs are

    python benchmarks/reliability.py --kill 50 --fuzz 100000 --soak 10000          # the issue's figures
    python benchmarks/reliability.py --kill 6 --fuzz 3000 --soak 500 --timeouts --json out.json

and print one table. The runs live in :mod:`commlayer.testing.reliability`; this file is their
command line (the same flags as before they moved there).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from commlayer.testing.reliability import fuzz_decoder, fuzz_socket, run_kill, run_soak, run_timeouts, table


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--kill", type=int, default=0, help="kill runs (issue 7: 50)")
    ap.add_argument("--fuzz", type=int, default=0, help="malformed messages, in-process and over a live socket (issue 7: 100000)")
    ap.add_argument("--soak", type=int, default=0, help="random collectives on --world ranks (issue 7: 10000)")
    ap.add_argument("--timeouts", action="store_true", help="every blocking call against a rank that stopped participating")
    ap.add_argument("--world", type=int, default=4, help="ranks of the soak")
    ap.add_argument("--heartbeat", type=float, default=2.0, help="COMMLAYER_HEARTBEAT of the kill runs")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write every figure (with the unclean runs' details) here")
    args = ap.parse_args(argv)
    if not (args.kill or args.fuzz or args.soak or args.timeouts):
        ap.error("nothing to do: give --kill, --fuzz, --soak and/or --timeouts")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("commlayer").setLevel(logging.CRITICAL)
    res: dict[str, Any] = {"seed": args.seed}
    say = (lambda m: print(m, file=sys.stderr, flush=True))
    if args.kill:
        res["kill"] = run_kill(args.kill, args.seed, args.heartbeat, log=say)
    if args.fuzz:
        say(f"fuzz: {args.fuzz} messages into unpack_header/check_frames")
        res["fuzz_decoder"] = fuzz_decoder(args.fuzz, args.seed)
        res["fuzz_decoder_no_deep"] = fuzz_decoder(args.fuzz, args.seed, deep=False)
        say(f"fuzz: {args.fuzz} messages into a live rank's socket (without the deep-nesting headers)")
        res["fuzz_socket"] = fuzz_socket(args.fuzz, args.seed, deep=False)
        say("fuzz: 2000 messages into a live rank's socket, two of them deep-nesting headers")
        res["fuzz_socket_deep"] = fuzz_socket(2000, args.seed + 1, deep=False, deep_every=1000)
    if args.soak:
        say(f"soak: {args.soak} random collectives on {args.world} ranks")
        res["soak"] = run_soak(args.soak, args.seed, world=args.world)
    if args.timeouts:
        say("timeouts: every kind of blocking call against a stalled rank")
        res["timeouts"] = run_timeouts()
    print(table(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
