"""When a round closes: at the quorum of members expected in time, or at a deadline from measured step times.

A pure function over what the store shows (unit-tested without processes). Round ``r`` is built
on round ``r - 1``: its expected contributors are the live members that started their local phase
from round ``r - 1`` and whose predicted phase time (``period`` x their measured step time) is
within ``slack`` x the members' median. A straggler beyond that is not waited for; its
contribution, computed from an older round, joins whichever round is open when it arrives, as
long as its staleness is within ``max_staleness`` (else it is dropped, and the drop is recorded).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from commlayer.fleet.config import FleetConfig


@dataclass(frozen=True)
class Pending:
    """A contribution announced in the store and not applied yet."""

    owner: int
    seq: int
    base: int  # the round it was computed from
    samples: int
    digest: str


@dataclass(frozen=True)
class Member:
    """A registered peer as the store shows it."""

    id: int
    live: bool
    active: bool  # it has taken part (fetched state and started a local phase)
    start: int  # the round its current local phase started from (-1: none)
    tau: float | None  # its predicted phase seconds (None: not measured yet)


@dataclass(frozen=True)
class Decision:
    """A round's content: what it includes, what it drops as too stale, and why it closed now."""

    include: tuple[Pending, ...]
    dropped: tuple[Pending, ...]
    members: tuple[int, ...]  # the round's membership: who contributes to it, or was expected to
    live: tuple[int, ...]  # the live set when it closed
    reason: str
    waited_on: tuple[int, ...]  # expected members that had not contributed when it closed


def decide(r: int, members: list[Member], pending: list[Pending], opened: float, now: float,
           cfg: FleetConfig) -> Decision | None:
    """The decision to close round ``r`` now, or None to keep waiting.

    Args:
        r: the round to close (``r - 1`` is the last committed one).
        members: every registered peer.
        pending: contributions not applied in rounds ``<= r - 1``.
        opened: when round ``r - 1`` was seen committed (monotonic seconds of the caller).
        now: the caller's monotonic time.
    """
    include = tuple(p for p in pending if r - 1 - p.base <= cfg.max_staleness)
    dropped = tuple(p for p in pending if r - 1 - p.base > cfg.max_staleness)
    live = [m for m in members if m.live and m.active]
    fresh = {p.owner for p in include if p.base == r - 1}
    due = [m for m in live if m.start == r - 1 and m.id not in fresh]
    taus = [m.tau for m in live if m.tau is not None]
    median = statistics.median(taus) if taus else None
    if cfg.close == "deadline" and median is not None:
        due = [m for m in due if m.tau is None or m.tau <= cfg.slack * median]
    waiting = tuple(m.id for m in due)
    ids = tuple(sorted({p.owner for p in include} | {m.id for m in live if m.start == r - 1}))
    alive = tuple(sorted(m.id for m in live))
    if (not include and not dropped) or (r == 1 and len(live) < cfg.min_members):
        return None
    if not waiting and include:
        return Decision(include, dropped, ids, alive, "quorum" if cfg.close == "deadline" else "all", waiting)
    if cfg.close == "deadline":
        deadline = opened + max(cfg.min_deadline, cfg.slack * median if median is not None else cfg.timeout / 4)
        if now >= deadline:
            return Decision(include, dropped, ids, alive, "deadline", waiting)
    return None
