"""Shared pieces of the alpha-beta cost model that every all-reduce algorithm prices itself with.

Every directed link i->j has a one-way latency ``alpha[i][j]`` (s) and a bandwidth ``beta[i][j]``
(bytes/s): a message of n bytes takes ``alpha + n / beta`` once the link is free, and a link carries
one message at a time (FIFO). On top, each message costs ``msg_overhead_s`` of CPU at the receiver,
and reductions run at ``reduce_Bps``. Each algorithm's file replays its own message schedule over
these links (``ring_allreduce_time`` in :mod:`ring`, ...) and the registry
(:mod:`commlayer.topologies.registry`) names that function; :mod:`commlayer.adapt.cost` composes
them with codec profiles. Only the link matrix's ``size``, ``alpha`` and ``beta`` are read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence


class Links(Protocol):
    """What the cost functions read of a link matrix (``commlayer.adapt.estimator.LinkMatrixSnapshot``)."""

    @property
    def size(self) -> int: ...

    @property
    def alpha(self) -> Sequence[Sequence[float]]: ...

    @property
    def beta(self) -> Sequence[Sequence[float]]: ...


@dataclass(frozen=True)
class CostParams:
    """CPU-side constants of the model.

    Attributes:
        msg_overhead_s: per-message software cost (header, mailbox, hand-off).
        reduce_Bps: elementwise reduction throughput (bytes of operand per second).
        copy_Bps: memory copy throughput.
        max_sim_chunks: chunks per block simulated; more are merged (their overhead kept).
    """

    msg_overhead_s: float = 1.5e-4
    reduce_Bps: float = 1.0e9
    copy_Bps: float = 3.0e9
    max_sim_chunks: int = 32


def chunking(block: float, chunk_bytes: int, params: CostParams) -> tuple[int, float, float]:
    """(simulated chunks, bytes per simulated chunk, overhead per simulated chunk)."""
    real = max(1, math.ceil(block / max(1, chunk_bytes)))
    k = min(real, params.max_sim_chunks)
    return k, block / k, params.msg_overhead_s * real / k


def direct_allgather_time(s: Links, block_bytes: float, params: CostParams) -> float:
    """All-gather where every rank sends its ``block_bytes`` payload straight to every other rank.

    A rank's sends leave one after another on its own links (independent links, as in the
    emulator); it is done once the last payload addressed to it has arrived.
    """
    p = s.size
    if p <= 1 or block_bytes <= 0:
        return 0.0
    o = params.msg_overhead_s
    done = [0.0] * p
    for src in range(p):
        t = 0.0
        for k in range(1, p):
            dst = (src + k) % p
            t += block_bytes / s.beta[src][dst]
            done[dst] = max(done[dst], t + s.alpha[src][dst]) + o
    return max(done)
