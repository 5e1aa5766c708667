"""Shared pieces of the alpha-beta cost model that every all-reduce algorithm prices itself with.

Every directed link i->j has a one-way latency ``alpha[i][j]`` (s) and a bandwidth ``beta[i][j]``
(bytes/s): a message of n bytes takes ``alpha + n / beta`` once the link is free, and a link carries
one message at a time (FIFO). Each message also carries ``msg_wire_bytes`` of framing on its link (the
per-message cost that a link which is never idle pays: it is what makes fewer, larger chunks win when
pipelining buys nothing) and costs ``msg_overhead_s`` of CPU at the receiver; reductions run at
``reduce_Bps``. Each algorithm's file replays its own message schedule over
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
        msg_overhead_s: per-message software cost at the receiver (header, mailbox, hand-off).
        msg_wire_bytes: per-message framing on the link: the msgpack header of a ring chunk (78 bytes for
            ``allreduce`` of float32 with a plan tag, measured) plus ZMTP's frame headers (2 + 9 bytes), rounded
            up. A link that is busy all along (a pipelined ring on a bandwidth-bound link: each rank sends its
            first block at once, so its link never waits) pays it once per message, and nothing else in the
            model depends on the chunk size there; without it 64 KiB and 256 KiB chunks tie exactly and the
            tie-break picked the most messages (issue 11, the bloated 2 Mbit/s link).
        reduce_Bps: elementwise reduction throughput (bytes of operand per second).
        copy_Bps: memory copy throughput.
        max_sim_chunks: chunks per block simulated; more are merged (their overhead kept).
    """

    msg_overhead_s: float = 1.5e-4
    msg_wire_bytes: float = 96.0
    reduce_Bps: float = 1.0e9
    copy_Bps: float = 3.0e9
    max_sim_chunks: int = 32


def chunking(block: float, chunk_bytes: int, params: CostParams) -> tuple[int, float, float]:
    """(simulated chunks, bytes per simulated chunk, overhead per simulated chunk)."""
    real = max(1, math.ceil(block / max(1, chunk_bytes)))
    k = min(real, params.max_sim_chunks)
    return k, block / k, params.msg_overhead_s * real / k


def framing(block: float, chunk_bytes: int, params: CostParams) -> float:
    """Framing bytes per simulated chunk of :func:`chunking` (``msg_wire_bytes`` of every real chunk it merges)."""
    real = max(1, math.ceil(block / max(1, chunk_bytes)))
    return params.msg_wire_bytes * real / min(real, params.max_sim_chunks)


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
            t += (block_bytes + params.msg_wire_bytes) / s.beta[src][dst]
            done[dst] = max(done[dst], t + s.alpha[src][dst]) + o
    return max(done)
