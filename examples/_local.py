"""Shared by the examples: run local ranks (commlayer.testing.run_world), and the exit status of a run that lost some of them."""

from __future__ import annotations

import argparse
import os
import signal
from typing import Callable

from commlayer.testing import run_world


def maybe_die(rank: int, step: int, args: argparse.Namespace) -> None:
    """``--kill-rank R --kill-step S``: rank R kills itself (SIGKILL, no goodbye) at step S (fault demos and tests)."""
    if args.kill_rank == rank and step == args.kill_step:
        print(f"rank {rank} step {step}: killing itself (--kill-rank)", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def add_fault_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--kill-rank", type=int, default=-1, help="this rank SIGKILLs itself at --kill-step (fault demo)")
    ap.add_argument("--kill-step", type=int, default=50)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole local run")


def _rank(rank: int, size: int, train: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> None:
    train(args)  # commlayer.testing.run_world set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT


def spawn(train: Callable[[argparse.Namespace], None], nproc: int, args: argparse.Namespace) -> int:
    """Runs ``train(args)`` on ``nproc`` local ranks (commlayer.testing's launcher); returns the run's exit status.

    0 when every rank that was not killed by a signal finished cleanly (training finished on the
    survivors); otherwise 1, with each failed rank's error printed.
    """
    try:
        results = run_world(_rank, nproc, train, args, timeout=args.timeout, allow_failures=True)
    except TimeoutError as exc:
        print(f"{exc}", flush=True)
        return 1
    errors = {r: v for r, v in enumerate(results) if isinstance(v, str) and v.startswith("ERROR: ")}
    killed = [r for r, v in errors.items() if v.startswith("ERROR: process exited with code -")]
    failed = {r: v for r, v in errors.items() if r not in killed}
    if killed:
        print(f"ranks {killed} were killed by a signal; "
              + ("the others finished training" if not failed and len(killed) < nproc else "the run failed"), flush=True)
    for r, v in sorted(failed.items()):
        print(f"--- rank {r} failed ---\n{v[len('ERROR: '):]}", flush=True)
    return 1 if failed or len(killed) == nproc else 0
