"""Message schedules: what every algorithm sends, step by step, as numpy batches.

Each algorithm's file describes its own schedule next to the code that runs it
(:func:`commlayer.topologies.ring.ring_schedule`, ...); the registry names it
(``Algorithm.schedule``). ``tests/test_sim_schedule.py`` runs every algorithm over real sockets
with a transport send observer and checks that the messages each rank sent are exactly the
schedule's, in order; the simulator (:mod:`commlayer.sim`) replays the same schedules over link
matrices. So the real code, the schedule and the simulator cannot drift apart silently.

A :class:`Step` is a batch of messages laid out as rows: row ``g`` holds the messages one sender
issues in this step, in issue order (columns), with a mask for ragged rows. A message of step ``s``
and chunk ``j`` leaves its sender once the sender has processed everything it received of chunk
``j`` in earlier steps (the data dependency of every algorithm here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

#: What the receiver does with a message: combine it into its buffer, copy it, or nothing (CPU cost).
WORKS = ("reduce", "copy", "none")


@dataclass(frozen=True)
class Step:
    """One step of a schedule.

    Attributes:
        src: ``(G,)`` sender of each row (a rank appears in at most one row).
        dst: ``(G, M)`` destination of each message.
        nbytes: ``(G, M)`` payload bytes of each message (0 where ``mask`` is False).
        chunk: ``(G, M)`` chunk index (the data dependency, see the module docstring).
        mask: ``(G, M)`` which entries are messages (None: all).
        work: what receivers do with the payload: one of :data:`WORKS`.
        one_link: every row sends all its messages to one destination, distinct across rows
            (a ring or chain step): queues are then per row.
        phase: program phase; a sender's first message of a later phase also waits until it has
            processed everything it received in earlier phases (a second loop starts after the first).
    """

    src: np.ndarray
    dst: np.ndarray
    nbytes: np.ndarray
    chunk: np.ndarray
    mask: np.ndarray | None = None
    work: str = "reduce"
    one_link: bool = False
    phase: int = 0

    def __post_init__(self) -> None:
        if self.work not in WORKS:
            raise ValueError(f"Expected work in {WORKS}, got {self.work!r}")
        g = self.src.shape[0]
        for name in ("dst", "nbytes", "chunk"):
            a = getattr(self, name)
            if a.ndim != 2 or a.shape[0] != g:
                raise ValueError(f"Step.{name}: expected shape ({g}, M), got {a.shape}")

    def messages(self) -> Iterator[tuple[int, int, int, int]]:
        """Every message as ``(src, dst, nbytes, chunk)``, row by row in issue order (for tests and small worlds)."""
        m = np.ones(self.dst.shape, dtype=bool) if self.mask is None else self.mask
        for g in range(self.src.shape[0]):
            for k in range(self.dst.shape[1]):
                if m[g, k]:
                    yield int(self.src[g]), int(self.dst[g, k]), int(self.nbytes[g, k]), int(self.chunk[g, k])

    @property
    def total_bytes(self) -> int:
        return int(self.nbytes.sum() if self.mask is None else self.nbytes[self.mask].sum())


def sends_by_rank(steps: "list[Step] | Iterator[Step]", size: int) -> list[list[tuple[int, int]]]:
    """Per sender, its messages as ``(dst, nbytes)`` in schedule order (what a send observer records)."""
    out: list[list[tuple[int, int]]] = [[] for _ in range(size)]
    for st in steps:
        for s, d, n, _ in st.messages():
            out[s].append((d, n))
    return out


def single(src: list[int], dst: list[int], nbytes: list[int], work: str = "reduce") -> Step:
    """A step in which each ``src[i]`` sends one message of chunk 0 (trees, folds, pairwise exchanges)."""
    s = np.asarray(src, dtype=np.int64)
    return Step(s, np.asarray(dst, dtype=np.int64).reshape(-1, 1), np.asarray(nbytes, dtype=np.int64).reshape(-1, 1),
                np.zeros((len(s), 1), dtype=np.int64), work=work)


def fan(src: list[int], dsts: list[list[int]], nbytes: list[list[int]], work: str = "reduce") -> Step:
    """A step in which ``src[i]`` sends to each of ``dsts[i]`` in order (ragged rows padded and masked)."""
    g = len(src)
    m = max((len(d) for d in dsts), default=0)
    dst = np.zeros((g, max(m, 1)), dtype=np.int64)
    nb = np.zeros((g, max(m, 1)), dtype=np.int64)
    mask = np.zeros((g, max(m, 1)), dtype=bool)
    for i, (d, n) in enumerate(zip(dsts, nbytes)):
        dst[i, :len(d)] = d
        nb[i, :len(d)] = n
        mask[i, :len(d)] = True
    return Step(np.asarray(src, dtype=np.int64), dst, nb, np.zeros_like(dst), mask=mask, work=work)
