"""Knobs of a fleet (one frozen dataclass, validated once)."""

from __future__ import annotations

from dataclasses import dataclass

CLOSE_MODES = ("deadline", "all")


@dataclass(frozen=True)
class FleetConfig:
    """How a fleet's rounds are paced and averaged.

    Attributes:
        period: local steps per contribution (DiLoCo's H).
        outer_lr: outer learning rate (1.0 with momentum 0 = plain sample-weighted model averaging).
        outer_momentum: outer Nesterov momentum (DiLoCo: 0.9; 0 turns it off).
        close: "deadline": a round closes once every member expected in time has contributed, or at the
            deadline; "all": a round waits for every live member (the fixed-world behaviour, for comparison).
        slack: deadline = round opening + ``slack`` x the median predicted phase time of its members.
        min_deadline: least seconds a round waits for expected contributions.
        max_staleness: a contribution computed from round ``b`` may still be applied in round ``b + 1 +
            max_staleness``; older ones are dropped (recorded in the round's ledger entry, never silently).
        heartbeat: seconds between a peer's heartbeat increments in the store.
        dead_after: seconds without a heartbeat after which a peer is out of the live set.
        poll: seconds between store polls while a peer waits for a round to close.
        keep_rounds: aggregates kept in the store, for peers catching up (older ones are deleted).
        timeout: seconds any single wait may take before it fails with an error naming what it waited for.
        min_members: round 1 does not close while fewer live members are active (a fleet's start barrier).
        keep_payloads: keep every contribution's payload in the store (audits and tests replay the rounds).
    """

    period: int = 10
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    close: str = "deadline"
    slack: float = 1.5
    min_deadline: float = 0.5
    max_staleness: int = 8
    heartbeat: float = 0.25
    dead_after: float = 1.5
    poll: float = 0.02
    keep_rounds: int = 32
    timeout: float = 120.0
    min_members: int = 1
    keep_payloads: bool = False

    def __post_init__(self) -> None:
        if self.period < 1:
            raise ValueError(f"FleetConfig.period: expected >= 1 local steps, got {self.period}")
        if self.min_members < 1:
            raise ValueError(f"FleetConfig.min_members: expected >= 1, got {self.min_members}")
        if self.close not in CLOSE_MODES:
            raise ValueError(f"FleetConfig.close: expected one of {CLOSE_MODES}, got {self.close!r}")
        if self.slack < 1.0:
            raise ValueError(f"FleetConfig.slack: expected >= 1.0, got {self.slack}")
        if self.max_staleness < 0:
            raise ValueError(f"FleetConfig.max_staleness: expected >= 0, got {self.max_staleness}")
        if not 0 < self.heartbeat < self.dead_after:
            raise ValueError(f"FleetConfig: expected 0 < heartbeat < dead_after, got {self.heartbeat} and {self.dead_after}")
        if self.keep_rounds <= self.max_staleness + 1:
            raise ValueError(f"FleetConfig.keep_rounds: expected > max_staleness + 1 = {self.max_staleness + 1}, "
                             f"got {self.keep_rounds} (a late peer catches up from the kept aggregates)")
        for name in ("outer_lr", "min_deadline", "poll", "timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"FleetConfig.{name}: expected a positive number, got {getattr(self, name)}")
        if not 0 <= self.outer_momentum < 1:
            raise ValueError(f"FleetConfig.outer_momentum: expected 0 <= momentum < 1, got {self.outer_momentum}")
