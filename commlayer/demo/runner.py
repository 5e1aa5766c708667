"""Runs the demo worker on N ranks over emulated links and collects its results.

Starts an emulated world (:mod:`commlayer.wan`), one process per rank (the one launcher,
:func:`commlayer.testing.run_ranks`), parses rank 0's ``@@``
protocol lines (progress, start/end markers, results) and attributes the emulator's byte counters
to each configuration between its start and end markers.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from commlayer.testing.launch import run_ranks
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
    """Runs ``python -m module args`` on ``nproc`` emulated ranks (:func:`commlayer.testing.run_ranks`); returns parsed results.

    Exit codes: a rank still running when the run timed out reads 124; one stopped because
    another failed reads -15 (SIGTERM).
    """
    results: list[dict[str, Any]] = []
    tail: deque[str] = deque(maxlen=60)
    with emulated_world(nproc, links, mode=mode, seed=seed) as world:  # type: ignore[arg-type]
        marks: dict[str, int] = {}

        def on_line(rank: int, line: str) -> None:  # serialized by run_ranks
            if rank != 0 or not line.startswith("@@ "):
                tail.append(f"[rank {rank}] {line}")
                return
            event, _, payload = line[3:].partition(" ")
            data = json.loads(payload)
            total = sum(world.bytes_sent())
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

        commands = [[*world.prefix(r), sys.executable, "-m", module, *args] for r in range(nproc)]
        envs = [{**os.environ, **world.env(r), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"} for r in range(nproc)]
        res = run_ranks(commands, envs, on_line, timeout_s=timeout_s, grace_s=3.0)
    if res.timed_out:
        logger.error("world timed out after %.0f s; terminated the ranks", timeout_s)
    stopped = 124 if res.timed_out else -15
    return WorldRun(results, mode, [stopped if c is None else c for c in res.codes], list(tail))
