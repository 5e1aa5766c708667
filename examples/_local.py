"""Shared by the examples: spawn local ranks, and the exit status of a run that lost some of them."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import socket
from typing import Callable


def maybe_die(rank: int, step: int, args: argparse.Namespace) -> None:
    """``--kill-rank R --kill-step S``: rank R kills itself (SIGKILL, no goodbye) at step S (fault demos and tests)."""
    if args.kill_rank == rank and step == args.kill_step:
        print(f"rank {rank} step {step}: killing itself (--kill-rank)", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def add_fault_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--kill-rank", type=int, default=-1, help="this rank SIGKILLs itself at --kill-step (fault demo)")
    ap.add_argument("--kill-step", type=int, default=50)


def _child(train: Callable[[argparse.Namespace], None], rank: int, size: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    train(args)


def spawn(train: Callable[[argparse.Namespace], None], nproc: int, args: argparse.Namespace) -> int:
    """Runs ``train(args)`` on ``nproc`` local ranks; returns the run's exit status.

    0 when every rank that was not killed by a signal finished cleanly (training finished on the
    survivors); otherwise the highest exit code of a rank that failed by itself.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_child, args=(train, r, nproc, port, args)) for r in range(nproc)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    codes = [p.exitcode or 0 for p in procs]
    killed = [r for r, c in enumerate(codes) if c < 0]
    failed = [c for c in codes if c > 0]
    if killed:
        print(f"ranks {killed} were killed by a signal; "
              + ("the others finished training" if not failed and len(killed) < nproc else "the run failed"), flush=True)
    if failed:
        return max(failed)
    return 0 if len(killed) < nproc else 1
