"""``commlayer launch``: run N local ranks of a script over emulated links, like torchrun.

Each rank gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, ...) plus COMMLAYER_* variables, so the same script runs unmodified
under torchrun. Output is forwarded line by line with a ``[rank N]`` prefix. If a rank fails,
the others are terminated after a grace period; the whole run is bounded by ``timeout_s``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import IO, Any, Mapping, Sequence

from commlayer.wan.world import Mode, emulated_world

logger = logging.getLogger(__name__)

EXIT_TIMEOUT = 124
_POLL_S = 0.05
_KILL_WAIT_S = 5.0


def _forward(rank: int, stream: IO[str], out: IO[str], lock: threading.Lock) -> None:
    for line in stream:
        with lock:
            out.write(f"[rank {rank}] {line if line.endswith(chr(10)) else line + chr(10)}")
            out.flush()
    stream.close()


def _signal_group(p: subprocess.Popen[str], sig: int) -> None:
    try:
        os.killpg(p.pid, sig)  # the rank's own session (start_new_session=True), by id
    except (ProcessLookupError, PermissionError):
        pass


def _stop_all(procs: list[subprocess.Popen[str]]) -> None:
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + _KILL_WAIT_S
    for p in alive:
        try:
            p.wait(timeout=max(0.01, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(p, signal.SIGKILL)
            p.wait(timeout=_KILL_WAIT_S)


def _code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


def launch(nproc: int, links: Any, script: str, args: Sequence[str] = (), mode: Mode = "relay", *,
           timeout_s: float | None = None, grace_s: float = 5.0, seed: int = 0, python: str | None = None,
           env: Mapping[str, str] | None = None, out: IO[str] | None = None) -> int:
    """Starts ``nproc`` ranks of ``python script args`` over emulated links and waits for them.

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
        0 if every rank exited 0; 124 on timeout; else the first failing rank's exit code
        (128 + signal number for a rank killed by a signal).
    """
    out = out if out is not None else sys.stdout
    lock = threading.Lock()
    procs: list[subprocess.Popen[str]] = []
    readers: list[threading.Thread] = []
    with emulated_world(nproc, links, mode=mode, seed=seed) as world:
        try:
            for r in range(nproc):
                penv = {**os.environ, **(env or {}), **world.env(r), "PYTHONUNBUFFERED": "1"}
                cmd = [*world.prefix(r), python or sys.executable, script, *args]
                p = subprocess.Popen(cmd, env=penv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True, errors="replace", start_new_session=True)
                procs.append(p)
                t = threading.Thread(target=_forward, args=(r, p.stdout, out, lock), daemon=True)
                t.start()
                readers.append(t)
            rc = _wait(procs, timeout_s, grace_s)
        except KeyboardInterrupt:
            rc = 130
        finally:
            _stop_all(procs)
            for t in readers:
                t.join(timeout=_KILL_WAIT_S)
    return rc


def _wait(procs: list[subprocess.Popen[str]], timeout_s: float | None, grace_s: float) -> int:
    start = time.monotonic()
    first_fail: tuple[int, int] | None = None
    fail_at = 0.0
    while True:
        codes = [p.poll() for p in procs]
        if first_fail is None:
            for r, c in enumerate(codes):
                if c is not None and c != 0:
                    first_fail, fail_at = (r, c), time.monotonic()
                    logger.error("rank %d exited with %d; stopping the others in %.1f s", r, c, grace_s)
                    break
        if all(c is not None for c in codes):
            break
        if first_fail is not None and time.monotonic() - fail_at > grace_s:
            break
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            logger.error("launch timed out after %.1f s; terminating all ranks", timeout_s)
            return EXIT_TIMEOUT
        time.sleep(_POLL_S)
    if first_fail is not None:
        return _code(first_fail[1])
    return 0
