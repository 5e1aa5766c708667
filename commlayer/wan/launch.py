"""``commlayer launch``: run N local ranks of a script over emulated links, like torchrun.

Each rank gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, ...) plus COMMLAYER_* variables, so the same script runs unmodified
under torchrun. Output is forwarded line by line with a ``[rank N]`` prefix. If a rank fails,
the others are terminated after a grace period; the whole run is bounded by ``timeout_s``.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import IO, Any, Mapping, Sequence

from commlayer.testing.launch import run_ranks
from commlayer.wan.world import Mode, emulated_world

EXIT_TIMEOUT = 124


def _code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


def launch(nproc: int, links: Any, script: str, args: Sequence[str] = (), mode: Mode = "relay", *,
           timeout_s: float | None = None, grace_s: float = 5.0, seed: int = 0, python: str | None = None,
           env: Mapping[str, str] | None = None, out: IO[str] | None = None) -> int:
    """Starts ``nproc`` ranks of ``python script args`` over emulated links and waits for them.

    The ranks run under :func:`commlayer.testing.run_ranks` (the repository's one launcher).

    Args:
        nproc: number of local ranks.
        links: profile name, link-matrix JSON path, parsed JSON or LinkMatrix.
        script: the Python script to run (a path).
        args: its arguments.
        mode: "relay" or "netns" (root).
        timeout_s: kill everything and return 124 after this many seconds (None: no limit).
        grace_s: after the first rank fails, how long the others may still finish.
        seed: jitter/loss seed.
        python: interpreter (default: this one).
        env: extra environment for every rank.
        out: where rank output goes (default: sys.stdout).

    Returns:
        0 if every rank exited 0; 124 on timeout; 130 on Ctrl-C; else the first failing rank's
        exit code (128 + signal number for a rank killed by a signal).
    """
    sink = out if out is not None else sys.stdout
    lock = threading.Lock()

    def forward(rank: int, line: str) -> None:
        with lock:
            sink.write(f"[rank {rank}] {line}\n")
            sink.flush()

    with emulated_world(nproc, links, mode=mode, seed=seed) as world:
        commands = [[*world.prefix(r), python or sys.executable, script, *args] for r in range(nproc)]
        envs = [{**os.environ, **(env or {}), **world.env(r), "PYTHONUNBUFFERED": "1"} for r in range(nproc)]
        try:
            res = run_ranks(commands, envs, forward, timeout_s=timeout_s, grace_s=grace_s)
        except KeyboardInterrupt:
            return 130
    if res.timed_out:
        return EXIT_TIMEOUT
    return _code(res.first_failure[1]) if res.first_failure else 0
