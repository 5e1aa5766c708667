"""Runs the demo worker on N ranks over emulated links and collects its results.

Starts an emulated world (:mod:`commlayer.wan`), one process per rank, parses rank 0's ``@@``
protocol lines (progress, start/end markers, results) and attributes the emulator's byte counters
to each configuration between its start and end markers.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from commlayer.wan import emulated_world, netns_unavailable_reason

logger = logging.getLogger(__name__)

Progress = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class WorldRun:
    """What one world run produced.

    Attributes:
        results: rank 0's per-configuration summaries, each with ``bytes_sent`` (all ranks, all links).
        mode: emulation mode used.
        returncodes: per-rank exit codes.
        tail: last output lines of every rank (for error messages).
    """

    results: list[dict[str, Any]]
    mode: str
    returncodes: list[int]
    tail: list[str] = field(default_factory=list)


def pick_mode(requested: str | None) -> tuple[str, str]:
    """(mode, note): netns when possible (fair gloo comparison), else relay with an explanation."""
    reason = netns_unavailable_reason()
    if requested == "netns" and reason:
        raise RuntimeError(f"netns mode unavailable: {reason}; run as root with /dev/net/tun, or pass --mode relay")
    if requested:
        return requested, ""
    if reason:
        return "relay", (f"netns mode unavailable ({reason}): falling back to relay mode, which shapes only commlayer's "
                         "transport; gloo would run on unshaped loopback, so gloo configurations are skipped")
    return "netns", ""


def run_world(nproc: int, links: Any, mode: str, module: str, args: list[str], *, timeout_s: float,
              on_event: Progress | None = None, seed: int = 0) -> WorldRun:
    """Runs ``python -m module args`` on ``nproc`` emulated ranks; returns parsed results."""
    results: list[dict[str, Any]] = []
    tail: deque[str] = deque(maxlen=60)
    lock = threading.Lock()
    procs: list[subprocess.Popen[str]] = []
    with emulated_world(nproc, links, mode=mode, seed=seed) as world:  # type: ignore[arg-type]
        marks: dict[str, int] = {}

        def reader(rank: int, p: subprocess.Popen[str]) -> None:
            assert p.stdout is not None
            for line in p.stdout:
                line = line.rstrip("\n")
                if rank == 0 and line.startswith("@@ "):
                    event, _, payload = line[3:].partition(" ")
                    data = json.loads(payload)
                    total = sum(world.bytes_sent())
                    with lock:
                        if event == "start":
                            marks[data["config"]] = total
                        elif event == "end":
                            data["bytes_sent"] = total - marks.pop(data["config"], total)
                            marks["__last_bytes__" + data["config"]] = data["bytes_sent"]
                        elif event == "result":
                            data["bytes_sent"] = marks.get("__last_bytes__" + data["config"], 0)
                            results.append(data)
                    if on_event is not None:
                        on_event(event, data)
                else:
                    with lock:
                        tail.append(f"[rank {rank}] {line}")
            p.stdout.close()

        threads = []
        try:
            for r in range(nproc):
                env = {**os.environ, **world.env(r), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
                cmd = [*world.prefix(r), sys.executable, "-m", module, *args]
                p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     text=True, errors="replace", start_new_session=True)
                procs.append(p)
                t = threading.Thread(target=reader, args=(r, p), daemon=True)
                t.start()
                threads.append(t)
            codes = _wait(procs, timeout_s)
        finally:
            _stop(procs)
            for t in threads:
                t.join(timeout=5.0)
    return WorldRun(results, mode, codes, list(tail))


def _wait(procs: list[subprocess.Popen[str]], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return [int(c) for c in codes]  # type: ignore[arg-type]
        if any(c not in (None, 0) for c in codes):
            time.sleep(3.0)  # let the others report their own error, then stop them
            return [p.poll() if p.poll() is not None else -15 for p in procs]  # type: ignore[misc]
        time.sleep(0.05)
    logger.error("world timed out after %.0f s; terminating ranks", timeout_s)
    return [124 if p.poll() is None else int(p.poll()) for p in procs]  # type: ignore[arg-type]


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, 15)
            except (ProcessLookupError, PermissionError):
                pass
    for p in procs:
        try:
            p.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, 9)
            except (ProcessLookupError, PermissionError):
                pass
            p.wait(timeout=5.0)
