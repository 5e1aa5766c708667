"""Supervision shared by the launcher's two front ends (:mod:`commlayer.testing.launch`): a bounded wait
loop, and stopping rank processes by id (each in its own session) so none is left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Callable, Sequence

POLL_S = 0.05


def supervise(timeout_s: float | None, done: Callable[[], bool], tick: Callable[[float], bool],
               poll_s: float = POLL_S) -> bool:
    """Calls ``tick(wait)`` until ``done()`` or ``timeout_s``; a tick returning False ends early. True if done."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not done():
        remaining = poll_s if deadline is None else deadline - time.monotonic()
        if remaining <= 0 or not tick(min(remaining, poll_s)):
            return done()
    return True


def sleep_tick(wait_s: float) -> bool:
    """A tick of :func:`supervise` that only waits."""
    time.sleep(wait_s)
    return True


def signal_quietly(pid: int, sig: int, group: bool) -> None:
    """Sends ``sig`` to the process ``pid`` (``group``: to its process group); one already gone is fine."""
    try:
        (os.killpg if group else os.kill)(pid, sig)  # by id: the rank's own session or the process itself
    except (ProcessLookupError, PermissionError):
        pass


def stop_sessions(procs: Sequence[subprocess.Popen[str]], wait_s: float = 5.0) -> None:
    """SIGTERM to the session of every process still running, SIGKILL to those still there ``wait_s`` s later."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        signal_quietly(p.pid, signal.SIGTERM, group=True)
    deadline = time.monotonic() + wait_s
    for p in alive:
        try:
            p.wait(timeout=max(0.01, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            signal_quietly(p.pid, signal.SIGKILL, group=True)
            p.wait(timeout=wait_s)
