"""Emulated local fleets: devices as real processes on this machine, joining and leaving on a schedule.

The harness hosts the fleet's TCPStore, starts each device as ``python -m commlayer.fleet.worker``
in its own session (stdout to a per-device log of JSON events), makes devices leave cleanly
(SIGTERM: the device records its leave) or die (SIGKILL), and starts new ones. Used by the tests,
``benchmarks/fleet.py`` and ``commlayer launch --fleet``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from commlayer.fleet.ledger import Keys, connect_store
from commlayer.fleet.seal import sealed
from commlayer.testing.ports import free_port

logger = logging.getLogger(__name__)


@dataclass
class Device:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    started: float
    ended: str = ""  # "", "left", "killed", "exited"
    slot: int = -1  # the fleet position whose samples it draws (-1: samples by name)
    end_t: float = 0.0

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out


@dataclass
class LocalFleet:
    """A fleet of local device processes (see the module docstring).

    Args:
        workdir: directory of the device logs.
        args: worker arguments shared by every device (besides --store/--job/--name).
        job: fleet name.
    """

    workdir: Path
    args: Sequence[str] = ()
    job: str = "fleet"
    prefix: Sequence[str] = ()
    store_addr: str = ""  # an external store (a hub in a network namespace); "" = host one here
    devices: dict[str, Device] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.keys = Keys(f"commlayer/fleet/{self.job}")
        if self.store_addr:
            self.port = int(self.store_addr.rpartition(":")[2])
            raw = connect_store(self.store_addr, 60.0)
        else:
            self.port = free_port()
            self.store_addr = f"127.0.0.1:{self.port}"
            raw = connect_store(self.store_addr, 60.0, master=True)
        self.store, _ = sealed(raw, self.keys.prefix, self.store_addr.rpartition(":")[0])  # reads the sealed ledger
        self.workdir.mkdir(parents=True, exist_ok=True)

    @property
    def addr(self) -> str:
        return self.store_addr

    def spawn(self, name: str, extra: Sequence[str] = (), store_addr: str = "", standby: bool = False,
              prefix: Sequence[str] | None = None) -> Device:
        """Starts device ``name`` (its own session, so it can be signalled alone); ``standby``: it boots and waits
        for :meth:`go` (so a join happens at a chosen round, not after the seconds an import of torch takes)."""
        log = self.workdir / f"{name}.log"
        cmd = [*(self.prefix if prefix is None else prefix), sys.executable, "-m", "commlayer.fleet.worker", "--store", store_addr or self.addr,
               "--job", self.job, "--name", name, *self.args, *extra, *(["--wait-go"] if standby else [])]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        dev = Device(name, proc, log, time.time())
        if "--slot" in extra:
            dev.slot = int(extra[list(extra).index("--slot") + 1])
        self.devices[name] = dev
        return dev

    def go(self, name: str, slot: int = -1) -> None:
        """Lets standby device ``name`` join now (drawing the samples of ``slot``, when >= 0: see the worker)."""
        self.devices[name].started = time.time()
        self.devices[name].slot = slot
        self.store.set(self.keys.k("go", name), json.dumps({"slot": slot} if slot >= 0 else {}))

    def leave(self, name: str) -> None:
        dev = self.devices[name]
        dev.proc.send_signal(signal.SIGTERM)
        dev.ended, dev.end_t = "left", time.time()

    def kill(self, name: str) -> None:
        dev = self.devices[name]
        dev.proc.send_signal(signal.SIGKILL)
        dev.ended, dev.end_t = "killed", time.time()

    def running(self) -> list[str]:
        return [n for n, d in self.devices.items() if d.proc.poll() is None and not d.ended]

    def latest(self) -> int:
        k = self.keys.k("latest")
        return int(self.store.get(k)) if self.store.check([k]) else 0

    def active(self, name: str) -> bool:
        return any(e.get("event") == "joined" for e in self.devices[name].events())

    def wait_round(self, r: int, timeout: float) -> int:
        """Waits until the fleet committed round ``r``; returns the newest round.

        Raises:
            TimeoutError: it did not, within ``timeout`` s (names the devices' states).
        """
        deadline = time.monotonic() + timeout
        while self.latest() < r:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fleet: round {r} not committed within {timeout:.0f} s (latest {self.latest()}); "
                                   f"devices: {self.describe()}")
            time.sleep(0.05)
        return self.latest()

    def wait_all(self, timeout: float) -> None:
        """Waits for every device process to exit (kills the rest after ``timeout`` s and raises)."""
        deadline = time.monotonic() + timeout
        while any(d.proc.poll() is None for d in self.devices.values()):
            if time.monotonic() > deadline:
                stuck = [n for n, d in self.devices.items() if d.proc.poll() is None]
                self.close()
                raise TimeoutError(f"fleet devices {stuck} did not finish within {timeout:.0f} s; {self.describe()}")
            time.sleep(0.1)

    def describe(self) -> str:
        out = []
        for n, d in self.devices.items():
            tail = d.log.read_text(errors="replace").strip().splitlines()[-1:] if d.log.exists() else []
            out.append(f"{n}(rc={d.proc.poll()}, {d.ended or 'running'}): {tail[0][:300] if tail else ''}")
        return "; ".join(out)

    def churn(self, rng: random.Random, joiner: str, exclude: Sequence[str] = ()) -> tuple[str, str] | None:
        """One churn event: a random running active device leaves (clean or SIGKILL, by coin) and standby ``joiner``
        joins (in the leaver's data slot); None when no running device is left to leave (the fleet finished)."""
        deadline = time.monotonic() + 300
        while not any(e.get("event") == "standby" for e in self.devices[joiner].events()):  # booted, ready to join
            if time.monotonic() > deadline or self.devices[joiner].proc.poll() is not None:
                raise TimeoutError(f"fleet: standby device {joiner} did not boot; {self.describe()}")
            time.sleep(0.05)
        candidates = sorted(n for n in self.running() if n not in exclude and self.active(n))
        if not candidates:  # the fleet finished its rounds while the standby booted: no churn event left to make
            return None
        victim = rng.choice(candidates)
        how = rng.choice(["left", "killed"])
        (self.leave if how == "left" else self.kill)(victim)
        self.go(joiner, self.devices[victim].slot)
        return victim, how

    def close(self) -> None:
        """Kills every device still running (by its pid) and reaps it."""
        for d in self.devices.values():
            if d.proc.poll() is None:
                d.proc.kill()
            try:
                d.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                logger.warning("fleet device %s (pid %d) did not exit after SIGKILL", d.name, d.proc.pid)
