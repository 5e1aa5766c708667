"""Alpha-beta cost model per link, composed per topology and algorithm.

Every directed link i->j has a one-way latency ``alpha[i][j]`` (s) and a bandwidth ``beta[i][j]``
(bytes/s): a message of n bytes takes ``alpha + n / beta`` once the link is free, and a link carries
one message at a time (FIFO). On top, each message carries ``msg_wire_bytes`` of framing on its link
and costs ``msg_overhead_s`` of CPU at the receiver, and reductions run at ``reduce_Bps``. The framing
is the per-message cost that decides the chunk size where pipelining buys nothing (a bandwidth-bound
ring keeps every link busy whatever the chunk): fewer, larger chunks win there, smaller ones where
links would otherwise wait (long latency, a slow link upstream).

Algorithms are composed by replaying their exact message schedule over these links (a small
event recursion, not a closed form), so heterogeneous links, pipelining and ring order come out
right: in a pipelined ring the slowest link dominates every step, recursive doubling pays each
round's slowest pair, a parameter server pays its busiest server link twice. Each algorithm's
replay lives next to the algorithm (``topologies/ring.py``, ...) and the algorithm registry
(:mod:`commlayer.topologies.registry`) names it; :func:`allreduce_time` prices any registered
algorithm. Codecs add their measured encode/decode time and shrink the bytes to their wire size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from commlayer.adapt.estimator import LinkMatrixSnapshot
from commlayer.topologies import registry
from commlayer.topologies.cost import CostParams, chunking as _chunking, direct_allgather_time
from commlayer.topologies.ps_collective import ps_time
from commlayer.topologies.recursive_doubling import recursive_doubling_time
from commlayer.topologies.ring import ring_allgather_time, ring_allreduce_time, ring_time

__all__ = ["CodecProfile", "CostParams", "EXACT", "allreduce_time", "direct_allgather_time", "gossip_time", "ps_time",
           "recursive_doubling_time", "ring_allgather_time", "ring_allreduce_time", "ring_time", "_chunking"]


def gossip_time(s: LinkMatrixSnapshot, nbytes: float, edges: Sequence[tuple[int, int]], params: CostParams) -> float:
    """One gossip round: every rank exchanges its tensor with its neighbours (undirected ``edges``)."""
    if not edges or nbytes <= 0:
        return 0.0
    o, w = params.msg_overhead_s, nbytes + params.msg_wire_bytes
    return max(max(s.alpha[a][b] + w / s.beta[a][b], s.alpha[b][a] + w / s.beta[b][a]) + o for a, b in edges) \
        + nbytes / params.reduce_Bps


@dataclass(frozen=True)
class CodecProfile:
    """A codec measured on this CPU.

    Attributes:
        spec: codec spec ("" = exact).
        ratio: wire bytes / raw bytes.
        encode_Bps: raw bytes encoded per second.
        decode_Bps: raw bytes decoded per second.
        rel_error: ||decode(encode(x)) - x|| / ||x|| on a Gaussian tensor.
        linear: payloads can be summed (ring all-reduce); otherwise all-gather + decode each.
        elem_scale: reduction cost of the summable payload relative to the raw tensor.
        rounds: sequential all-reduces of a linear codec (PowerSGD: 2, of P then Q), each of
            ``ratio / rounds`` of the bytes and each paying the algorithm's latency.
    """

    spec: str
    ratio: float = 1.0
    encode_Bps: float = math.inf
    decode_Bps: float = math.inf
    rel_error: float = 0.0
    linear: bool = True
    elem_scale: float = 1.0
    rounds: int = 1


EXACT = CodecProfile("")


def allreduce_time(s: LinkMatrixSnapshot, nbytes: float, algo: str, order: Sequence[int] | None, chunk_bytes: int,
                   params: CostParams, codec: CodecProfile = EXACT) -> float:
    """Predicted seconds of one all-reduce of ``nbytes`` with the registered ``algo`` and ``codec``.

    Linear codecs ride the algorithm's own all-reduce on the wire bytes; the others are all-gathered
    the way the algorithm declares (``gather``: around the ring or directly), then every rank
    decodes p payloads.

    Raises:
        ValueError: ``algo`` is not registered (the message lists the known names).
    """
    a = registry.get(algo)
    p = s.size
    wire = nbytes * codec.ratio
    enc = nbytes / codec.encode_Bps
    if codec.linear:
        dec = nbytes / codec.decode_Bps
        k = max(1, codec.rounds)
        return enc + k * a.cost(s, wire / k, order, chunk_bytes, params, codec.elem_scale / max(codec.ratio, 1e-9)) + dec
    if a.gather == "ring":
        gather = ring_allgather_time(s, wire, order if a.uses_order else None, chunk_bytes, params)
    else:
        gather = direct_allgather_time(s, wire, params)
    return enc + gather + p * nbytes / codec.decode_Bps
