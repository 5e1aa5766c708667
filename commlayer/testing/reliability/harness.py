"""The reliability runs' process harness: a forkserver that has imported torch, /proc census, leftovers.

Processes come from the launcher's ``forkserver`` that has imported torch once
(:func:`commlayer.testing.launch.preloaded_context`), so a kill run costs a fork, not a torch import. Ranks are :class:`commlayer.testing.Ranks` (kept by the
parent, which may kill, freeze or attack them).
"""

from __future__ import annotations

import os
import re
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch.distributed as dist

from commlayer import settings
from commlayer.testing.launch import Ranks, preloaded_context

def census(pid: int | str = "self") -> dict[str, int]:
    """File descriptors, OS threads and resident memory of a process (from /proc)."""
    out = {"fds": -1, "threads": -1, "rss_kb": -1, "hwm_kb": -1}
    try:
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key == "Threads":
                    out["threads"] = int(val)
                elif key == "VmRSS":
                    out["rss_kb"] = int(val.split()[0])
                elif key == "VmHWM":
                    out["hwm_kb"] = int(val.split()[0])
    except OSError:
        pass
    return out


def commlayer_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("commlayer"))


def context() -> Any:
    """The launcher's forkserver context, which has imported torch once (cheap children)."""
    return preloaded_context()


class World(Ranks):
    """``world`` forkserver processes running ``fn(rank, world, events, *args)``, commlayer's log silenced."""

    def __init__(self, fn: Callable[..., Any], world: int, *args: Any, env: Mapping[str, str] | None = None) -> None:
        super().__init__(fn, world, *args, env=env, context=context(), pass_events=True, quiet=True)


def remove_stale_ipc(pids: Sequence[int]) -> int:
    """Deletes IPC socket files of killed ranks (a SIGKILLed process cannot unlink its own)."""
    base = Path(settings.get("COMMLAYER_IPC_DIR"))
    n = 0
    for pid in pids:
        for f in base.glob(f"commlayer-{pid}-*.sock"):
            try:
                f.unlink()
                n += 1
            except OSError:
                pass
    return n


def world_transport() -> Any:
    """The zmq transport of the default process group."""
    pg: Any = dist.group.WORLD
    return pg.transport


def init_zmq(timeout: float) -> None:
    """The default process group on the zmq backend."""
    dist.init_process_group("zmq", timeout=timedelta(seconds=timeout))


def fd_names() -> list[str]:
    """What each open file descriptor of this process points to."""
    out = []
    for f in os.listdir("/proc/self/fd"):
        try:
            out.append(re.sub(r"\[\d+\]$", "", os.readlink(f"/proc/self/fd/{f}")))
        except OSError:
            pass
    return sorted(out)


def fd_diff(before: list[str], after: list[str]) -> list[str]:
    rest = list(before)
    added = []
    for x in after:
        if x in rest:
            rest.remove(x)
        else:
            added.append(x)
    return added
