"""A bare transport + group from torchrun-style environment variables (for the probe CLI, tests and
benchmarks that drive the planner without a torch process group)."""

from __future__ import annotations

import os
from datetime import timedelta

from commlayer.topologies.comm import Group
from commlayer.transport.config import TransportConfig
from commlayer.transport.endpoints import exchange_endpoints
from commlayer.transport.engine import Transport


def connect(rank: int, world_size: int, timeout: float = 60.0, channel: str = "adapt") -> Group:
    """Connects a transport among ``world_size`` ranks (rendezvous at MASTER_ADDR:MASTER_PORT through a
    ``torch.distributed.TCPStore``) and returns the world :class:`Group`. Close ``group.transport`` when done."""
    import torch.distributed as dist

    store = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"]), world_size,
                          rank == 0, timedelta(seconds=timeout))
    t = Transport(rank, world_size, TransportConfig.from_env(timeout=timeout), name=f"{channel}{rank}")
    try:
        info = t.listen()
        t.connect(exchange_endpoints(store, rank, world_size, info, timeout) if world_size > 1 else {rank: info})
        if world_size > 1:
            t.handshake(timeout)
    except BaseException:
        t.close()
        raise
    group = Group(t, list(range(world_size)), channel, timeout)
    group.store = store  # type: ignore[attr-defined]  # keep the store (and rank 0's server) alive as long as the group
    return group


def barrier(group: Group, tag: int = 0) -> None:
    """All ranks wait for each other (a tiny all-gather on the adaptation channel).

    Call it before closing a transport that ran over emulated links: a rank that exits right after
    its last send can otherwise tear the relay connection down before that send is delivered.
    """
    from commlayer.adapt.exchange import allgather_vector

    allgather_vector(group.transport, group.ranks, "__adapt_barrier__", tag, [0.0], group.timeout, op="barrier")
