"""Churn schedules for emulated fleets: every ``churn_every`` rounds a random device leaves and a new one joins.

Shared by ``commlayer launch --fleet`` and ``benchmarks/fleet.py``. The leaving device goes
cleanly (SIGTERM) or by SIGKILL, by a coin of a private RNG; the joiner is a booted standby
process (so the join happens at the scheduled round, not after an import of torch).
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from commlayer.fleet.audit import audit
from commlayer.fleet.emulate import LocalFleet


@dataclass(frozen=True)
class Schedule:
    """One emulated run.

    Attributes:
        devices: fleet size.
        rounds: rounds to train.
        churn_every: rounds between churn events (0: a fixed fleet).
        slow: how many devices are ``slow_factor`` x slower per step.
        step_sleep: seconds per local step of a normal device (its speed).
        seed: the schedule's RNG seed (who leaves, how).
        standbys: joiner processes booted ahead of their churn event.
        slot_data: devices draw samples by fleet slot, round and step instead of by name (paired comparisons).
        args: further worker arguments (see ``python -m commlayer.fleet.worker --help``).
    """

    devices: int = 8
    rounds: int = 200
    churn_every: int = 10
    slow: int = 0
    slow_factor: float = 5.0
    step_sleep: float = 0.01
    seed: int = 0
    close: str = "deadline"
    args: Sequence[str] = ()
    job: str = "fleet"
    standbys: int = 4  # booted joiners kept ahead (a boot of torch takes many rounds on a loaded machine)
    slot_data: bool = False  # samples by (slot, round, step): a joiner draws what the leaver would have (worker --slot)


@dataclass
class Outcome:
    events: list[dict[str, Any]] = field(default_factory=list)
    final_loss: float = float("nan")
    final_round: int = 0
    wall_s: float = 0.0
    audit: dict[str, Any] = field(default_factory=dict)
    join_s: list[float] = field(default_factory=list)
    round_s: float = 0.0  # median seconds between round commits
    late_folded: int = 0  # contributions applied in a later round than the one after their base


def run(s: Schedule, workdir: Path, timeout: float = 1800.0) -> Outcome:
    """Runs the schedule; returns what happened (the ledger audit included)."""
    rng = random.Random(s.seed)
    args = ["--rounds", str(s.rounds), "--min-members", str(s.devices), "--close", s.close, "--audit", *s.args]
    fleet = LocalFleet(workdir, args, job=s.job)
    out = Outcome()
    t0 = time.monotonic()
    try:
        for i in range(s.devices):
            sleep = s.step_sleep * (s.slow_factor if i < s.slow else 1.0)
            fleet.spawn(f"dev{i}", ["--step-sleep", str(sleep), *(["--slot", str(i)] if s.slot_data else [])])
        nxt = s.devices
        n_events = len(range(s.churn_every, s.rounds, s.churn_every)) if s.churn_every else 0
        pool = [f"dev{nxt + k}" for k in range(min(s.standbys, n_events))]  # booted standbys, ahead
        for name in pool:
            fleet.spawn(name, ["--step-sleep", str(s.step_sleep)], standby=True)
        nxt += len(pool)
        for r in range(s.churn_every, s.rounds, s.churn_every) if s.churn_every else ():
            fleet.wait_round(r, timeout)
            if fleet.latest() >= s.rounds - 1:  # the fleet got ahead of the schedule (slow boots): no churn left
                break
            joiner = pool.pop(0)
            event = fleet.churn(rng, joiner, exclude=[f"dev{i}" for i in range(s.slow)])
            if event is None:
                pool.insert(0, joiner)  # never called in: killed below with the other standbys
                break
            victim, how = event
            out.events.append({"round": fleet.latest(), "left": victim, "how": how, "joined": joiner})
            if len(out.events) + len(pool) < n_events:
                pool.append(f"dev{nxt}")
                fleet.spawn(pool[-1], ["--step-sleep", str(s.step_sleep)], standby=True)
                nxt += 1
        for name in pool:  # standbys never called in
            fleet.kill(name)
        fleet.wait_all(timeout)
        out.wall_s = time.monotonic() - t0
        a = audit(fleet.store, s.job)
        out.audit = {k: v for k, v in asdict(a).items() if k != "records"}
        done = [e for d in fleet.devices.values() for e in d.events() if e["event"] == "done" and not e["left"]]
        if done:
            last = max(done, key=lambda e: e["round"])
            out.final_loss, out.final_round = float(last["loss"]), int(last["round"])
        out.join_s = [e["join_s"] for d in fleet.devices.values() for e in d.events()
                      if e["event"] == "joined" and str(e["how"]).startswith("fetched")]
        ts = sorted(rec["t"] for rec in a.records)
        gaps = sorted(b - a_ for a_, b in zip(ts[2:], ts[3:]))
        out.round_s = gaps[len(gaps) // 2] if gaps else 0.0
        out.late_folded = sum(1 for rec in a.records for _o, _s, base, _n in rec["include"] if base < rec["round"] - 1)
        return out
    finally:
        fleet.close()
