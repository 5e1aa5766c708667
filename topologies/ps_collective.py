"""Sharded parameter-server all-reduce: an exact collective over co-located servers.

Every rank pushes shard s of its tensor to server rank s (group ranks 0..S-1), which reduces the
shard of every rank in rank order and sends the result back, so every rank ends with identical
bits. ``COMMLAYER_ALGO=ps`` selects it in the zmq backend (``COMMLAYER_PS_SERVERS`` servers,
default 1). :func:`ps_time` prices it over per-link alpha/beta (the registry's cost of "ps"). The
training parameter server (server threads, optimizer) is :mod:`commlayer.topologies.ps`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from commlayer import settings
from commlayer.topologies.comm import OpComm
from commlayer.topologies.cost import CostParams, Links
from commlayer.topologies.reduce_ops import ReduceOp, combine_
from commlayer.topologies.ring import even_bounds
from commlayer.topologies.schedule import Step, fan


def default_servers(size: int) -> int:
    return max(1, min(size, int(settings.get("COMMLAYER_PS_SERVERS"))))


def ps_allreduce(comm: OpComm, flat: torch.Tensor, op: ReduceOp, servers: int | None = None) -> None:
    """Exact all-reduce of ``flat`` in place through ``servers`` co-located servers (group ranks 0..S-1).

    Server s reduces block s of every rank in rank order and sends it back, so every rank ends
    with identical bits. AVG is left as a SUM (the caller divides), as in the other collectives.
    """
    p, me, n = comm.size, comm.rank, flat.numel()
    comm.declare(count=n, dtype=flat.dtype, redop=op)
    if p == 1 or n == 0:
        comm.finish()  # an empty call exchanges only fingerprints (see OpComm.declare)
        return
    s_count = min(p, servers or default_servers(p))
    bounds = even_bounds(n, s_count)
    for s, (a, b) in enumerate(bounds):
        if s != me and b > a:
            comm.send_tensor(s, 0, flat[a:b], copy=True)
    if me < s_count:
        a, b = bounds[me]
        if b > a:
            acc = None
            for w in range(p):
                part = flat[a:b] if w == me else comm.recv_tensor(w, 0, flat.dtype, b - a)
                if acc is None:
                    acc = part.clone()
                else:
                    combine_(acc, part, op)
            assert acc is not None  # p >= 2 parts were combined
            for w in range(p):
                if w != me:
                    comm.send_tensor(w, 1, acc)
            flat[a:b].copy_(acc)
    for s, (a, b) in enumerate(bounds):
        if s != me and b > a:
            flat[a:b].copy_(comm.recv_tensor(s, 1, flat.dtype, b - a))
    comm.finish()


def ps_schedule(size: int, numel: int, elem_size: int, servers: int | None = None) -> list[Step]:
    """What :func:`ps_allreduce` sends: every rank pushes shard s to server s, then each server sends its reduced shard back."""
    p = size
    if p <= 1 or numel == 0:
        return []
    s_count = min(p, servers or default_servers(p))
    shard = [(b - a) * elem_size for a, b in even_bounds(numel, s_count)]
    push = [[s for s in range(s_count) if s != me and shard[s]] for me in range(p)]
    pull = [[w for w in range(p) if w != s] if shard[s] else [] for s in range(s_count)]
    return [fan(list(range(p)), push, [[shard[s] for s in d] for d in push]),
            fan(list(range(s_count)), pull, [[shard[s]] * len(d) for s, d in enumerate(pull)], work="copy")]


def ps_time(s: Links, nbytes: float, servers: Sequence[int], params: CostParams) -> float:
    """Sharded parameter server: every rank pushes shard k to server k, servers reduce, everyone pulls.

    Links are independent (as in the emulator); a server's ingress is the sum of its incoming shards.
    """
    p, S = s.size, len(servers)
    if p <= 1 or nbytes <= 0 or S == 0:
        return 0.0
    shard = nbytes / S
    o = params.msg_overhead_s
    push = max((s.alpha[w][k] + (shard + params.msg_wire_bytes) / s.beta[w][k] + o) if w != k else 0.0 for k in servers for w in range(p))
    reduce = (p - 1) * shard / params.reduce_Bps
    pull = max((s.alpha[k][w] + (shard + params.msg_wire_bytes) / s.beta[k][w] + o) if w != k else 0.0 for k in servers for w in range(p))
    return push + reduce + pull


def ps_allreduce_time(s: Links, nbytes: float, order: Sequence[int] | None, chunk_bytes: int, params: CostParams,
                      elem_scale: float = 1.0) -> float:
    """:func:`ps_time` with the servers :func:`ps_allreduce` uses (``COMMLAYER_PS_SERVERS``), in the registry's signature."""
    return ps_time(s, nbytes, list(range(default_servers(s.size))), params)
