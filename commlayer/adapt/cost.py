"""Alpha-beta cost model per link, composed per topology and algorithm.

Every directed link i->j has a one-way latency ``alpha[i][j]`` (s) and a bandwidth ``beta[i][j]``
(bytes/s): a message of n bytes takes ``alpha + n / beta`` once the link is free, and a link carries
one message at a time (FIFO). On top, each message costs ``msg_overhead_s`` of CPU at the receiver,
and reductions run at ``reduce_Bps``.

Algorithms are composed by replaying their exact message schedule over these links (a small
event recursion, not a closed form), so heterogeneous links, pipelining and ring order come out
right: in a pipelined ring the slowest link dominates every step, recursive doubling pays each
round's slowest pair, a parameter server pays its busiest server link twice. Codecs add their
measured encode/decode time and shrink the bytes to their wire size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from commlayer.adapt.estimator import LinkMatrixSnapshot


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


def _chunking(block: float, chunk_bytes: int, params: CostParams) -> tuple[int, float, float]:
    """(simulated chunks, bytes per simulated chunk, overhead per simulated chunk)."""
    real = max(1, math.ceil(block / max(1, chunk_bytes)))
    k = min(real, params.max_sim_chunks)
    return k, block / k, params.msg_overhead_s * real / k


def ring_time(s: LinkMatrixSnapshot, nbytes: float, order: Sequence[int], chunk_bytes: int, params: CostParams,
              steps: int | None = None, reduce_steps: int | None = None, elem_scale: float = 1.0) -> float:
    """Seconds for a chunked, pipelined ring over ``order`` moving blocks of ``nbytes / p``.

    ``steps`` defaults to the all-reduce's 2(p-1) (an all-gather is p-1 with no reductions);
    ``reduce_steps`` of them combine what they receive. ``elem_scale`` scales reduction cost.
    """
    p = len(order)
    if p <= 1 or nbytes <= 0:
        return 0.0
    S = 2 * (p - 1) if steps is None else steps
    R = (p - 1) if reduce_steps is None else reduce_steps
    K, c, o = _chunking(nbytes / p, chunk_bytes, params)
    links = [(order[k], order[(k + 1) % p]) for k in range(p)]
    ser = [c / s.beta[a][b] for a, b in links]
    lat = [s.alpha[a][b] for a, b in links]
    red = c * elem_scale / params.reduce_Bps
    cpy = c / params.copy_Bps
    cpu = [0.0] * p        # rank order[k]'s thread clock
    free = [0.0] * p       # link k (order[k] -> order[k+1]) busy until
    arrive = [[0.0] * K for _ in range(p)]
    for k in range(p):     # step 0: every rank sends its first block at once
        for j in range(K):
            free[k] = max(free[k], cpu[k]) + ser[k]
            arrive[k][j] = free[k] + lat[k]
    for step in range(1, S + 1):
        prev = arrive
        arrive = [[0.0] * K for _ in range(p)]
        for k in range(p):
            up = prev[(k - 1) % p]  # what rank order[k] receives from order[k-1]
            for j in range(K):
                cpu[k] = max(cpu[k], up[j]) + o + (red if step <= R else cpy)
                if step < S:
                    free[k] = max(free[k], cpu[k]) + ser[k]
                    arrive[k][j] = free[k] + lat[k]
    return max(cpu)


def ring_allreduce_time(s: LinkMatrixSnapshot, nbytes: float, order: Sequence[int] | None, chunk_bytes: int,
                        params: CostParams, elem_scale: float = 1.0) -> float:
    order = list(range(s.size)) if order is None else list(order)
    return ring_time(s, nbytes, order, chunk_bytes, params, elem_scale=elem_scale)


def ring_allgather_time(s: LinkMatrixSnapshot, block_bytes: float, order: Sequence[int] | None, chunk_bytes: int,
                        params: CostParams) -> float:
    """All-gather of one ``block_bytes`` block per rank over a ring."""
    order = list(range(s.size)) if order is None else list(order)
    p = len(order)
    return ring_time(s, block_bytes * p, order, chunk_bytes, params, steps=p - 1, reduce_steps=0)


def recursive_doubling_time(s: LinkMatrixSnapshot, nbytes: float, params: CostParams, elem_scale: float = 1.0) -> float:
    """Recursive doubling (with the fold/unfold of non-powers of two), whole tensor per message."""
    p = s.size
    if p <= 1 or nbytes <= 0:
        return 0.0
    red = nbytes * elem_scale / params.reduce_Bps
    o = params.msg_overhead_s

    def xfer(a: int, b: int, t_send: float) -> float:
        return t_send + s.alpha[a][b] + nbytes / s.beta[a][b] + o

    t = [0.0] * p
    pof2 = 1 << (p.bit_length() - 1)
    rem = p - pof2
    for r in range(1, 2 * rem, 2):  # fold: even sends to odd
        t[r] = max(t[r], xfer(r - 1, r, t[r - 1])) + red
    active = [r for r in range(p) if not (r < 2 * rem and r % 2 == 0)]
    mask = 1
    while mask < pof2:
        new = list(t)
        for nr, r in enumerate(active):
            q = active[nr ^ mask]
            new[r] = max(t[r], xfer(q, r, t[q])) + red
        t = new
        mask <<= 1
    for r in range(1, 2 * rem, 2):  # unfold
        t[r - 1] = max(t[r - 1], xfer(r, r - 1, t[r])) + nbytes / params.copy_Bps
    return max(t)


def ps_time(s: LinkMatrixSnapshot, nbytes: float, servers: Sequence[int], params: CostParams) -> float:
    """Sharded parameter server: every rank pushes shard k to server k, servers reduce, everyone pulls.

    Links are independent (as in the emulator); a server's ingress is the sum of its incoming shards.
    """
    p, S = s.size, len(servers)
    if p <= 1 or nbytes <= 0 or S == 0:
        return 0.0
    shard = nbytes / S
    o = params.msg_overhead_s
    push = max((s.alpha[w][k] + shard / s.beta[w][k] + o) if w != k else 0.0 for k in servers for w in range(p))
    reduce = (p - 1) * shard / params.reduce_Bps
    pull = max((s.alpha[k][w] + shard / s.beta[k][w] + o) if w != k else 0.0 for k in servers for w in range(p))
    return push + reduce + pull


def gossip_time(s: LinkMatrixSnapshot, nbytes: float, edges: Sequence[tuple[int, int]], params: CostParams) -> float:
    """One gossip round: every rank exchanges its tensor with its neighbours (undirected ``edges``)."""
    if not edges or nbytes <= 0:
        return 0.0
    o = params.msg_overhead_s
    return max(max(s.alpha[a][b] + nbytes / s.beta[a][b], s.alpha[b][a] + nbytes / s.beta[b][a]) + o for a, b in edges) \
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
    """

    spec: str
    ratio: float = 1.0
    encode_Bps: float = math.inf
    decode_Bps: float = math.inf
    rel_error: float = 0.0
    linear: bool = True
    elem_scale: float = 1.0


EXACT = CodecProfile("")


def allreduce_time(s: LinkMatrixSnapshot, nbytes: float, algo: str, order: Sequence[int] | None, chunk_bytes: int,
                   params: CostParams, codec: CodecProfile = EXACT) -> float:
    """Predicted seconds of one all-reduce of ``nbytes`` with ``algo`` ("ring" or "tree") and ``codec``."""
    p = s.size
    wire = nbytes * codec.ratio
    enc = nbytes / codec.encode_Bps
    if codec.linear:
        dec = nbytes / codec.decode_Bps
        if algo == "ring":
            comm = ring_allreduce_time(s, wire, order, chunk_bytes, params, codec.elem_scale / max(codec.ratio, 1e-9))
        elif algo == "tree":
            comm = recursive_doubling_time(s, wire, params, codec.elem_scale / max(codec.ratio, 1e-9))
        else:
            raise ValueError(f"Expected algo 'ring' or 'tree', got {algo!r}")
        return enc + comm + dec
    if algo != "ring":
        raise ValueError(f"Expected algo 'ring' for a non-linear codec (all-gather), got {algo!r}")
    return enc + ring_allgather_time(s, wire, order, chunk_bytes, params) + p * nbytes / codec.decode_Bps
