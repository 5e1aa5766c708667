"""``World``: topology experiments over the commlayer transport, without torch.distributed.

    world = World.from_env()                      # RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    ring = world.ring(); tree = world.tree()
    ps = world.parameter_server(servers=2)
    gossip = world.gossip(graph="torus")
    y = ring.average(x); z = gossip.average(x, rounds=10)
    world.close()

Every rank must create the same topologies in the same order (each gets its own channel).
"""

from __future__ import annotations

import os
import threading
from datetime import timedelta
from typing import Any, Callable, Sequence

from commlayer import settings
from commlayer.topologies.base import Collective
from commlayer.topologies.comm import Group
from commlayer.topologies.gossip import Gossip
from commlayer.topologies.linear import barrier as _barrier
from commlayer.topologies.ps import ParameterServer
from commlayer.topologies.ring import DEFAULT_CHUNK_BYTES
from commlayer.transport.bootstrap import connect_transport


class World:
    """All ranks of a job, connected by one :class:`Transport` set up through a TCPStore.

    Args:
        rank: this process's rank.
        size: number of ranks.
        master_addr: TCPStore host (rank 0 hosts it).
        master_port: TCPStore port.
        timeout: seconds for setup and for every wait.
        seed: job seed shared by all ranks (codec randomness, random graphs).
        store: an existing c10d store to use instead of creating one.
    """

    def __init__(self, rank: int, size: int, master_addr: str = "127.0.0.1", master_port: int = 29500, timeout: float = 300.0,
                 seed: int = 0, store: Any = None) -> None:
        from torch.distributed import TCPStore

        self.rank, self.size, self.timeout, self.seed = rank, size, timeout, seed
        self.store = store if store is not None else TCPStore(master_addr, int(master_port), size, rank == 0,
                                                              timeout=timedelta(seconds=timeout))
        t = connect_transport(self.store, rank, size, timeout, "world", prefix="commlayer/world")
        self.transport = t
        self.dead: set[int] = set()
        self._lock = threading.Lock()
        self._listeners: list[Callable[[int], None]] = []
        self._count = 0
        t.add_failure_listener(self._on_failure)
        self._world_group = self.group("world")

    @classmethod
    def from_env(cls, timeout: float | None = None, seed: int = 0) -> "World":
        """From torchrun's variables: RANK, WORLD_SIZE, MASTER_ADDR (127.0.0.1), MASTER_PORT (29500)."""
        return cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), os.environ.get("MASTER_ADDR", "127.0.0.1"),
                   int(os.environ.get("MASTER_PORT", "29500")),
                   timeout if timeout is not None else settings.get("COMMLAYER_TIMEOUT") if settings.is_set("COMMLAYER_TIMEOUT") else 300.0, seed)

    # ---- failures -------------------------------------------------------------------------------
    def _on_failure(self, peer: int, reason: str) -> None:
        with self._lock:
            self.dead.add(peer)
            listeners = list(self._listeners)
        for cb in listeners:
            cb(peer)

    def on_failure(self, callback: Callable[[int], None]) -> None:
        """``callback(rank)`` when a rank dies or shuts down (runs on the I/O thread)."""
        with self._lock:
            self._listeners.append(callback)

    def alive(self) -> list[bool]:
        with self._lock:
            return [r not in self.dead for r in range(self.size)]

    # ---- topologies -----------------------------------------------------------------------------
    def channel(self, kind: str) -> str:
        self._count += 1
        return f"world/{kind}{self._count}"

    def group(self, kind: str, ranks: Sequence[int] | None = None) -> Group:
        return Group(self.transport, list(range(self.size)) if ranks is None else ranks, self.channel(kind), self.timeout)

    def ring(self, order: Sequence[int] | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Collective:
        """Chunked pipelined ring all-reduce (bandwidth-optimal), exact or with a codec."""
        return Collective(self, self.group("ring"), "ring", order, chunk_bytes)

    def tree(self) -> Collective:
        """Recursive doubling all-reduce (latency-optimal), exact or with a codec."""
        return Collective(self, self.group("tree"), "tree")

    def auto(self) -> Collective:
        """Ring or tree by message size (as the zmq backend's ``COMMLAYER_ALGO=auto``)."""
        return Collective(self, self.group("auto"), "auto")

    def parameter_server(self, servers: "int | Sequence[int]" = 1, **kwargs: Any) -> "Any":
        """A :class:`~commlayer.topologies.ps.ParameterServer` (see there for the options)."""
        return ParameterServer(self, self.group("ps"), servers, **kwargs)

    def gossip(self, graph: Any = "ring", **kwargs: Any) -> "Any":
        """A :class:`~commlayer.topologies.gossip.Gossip` averager over ``graph`` (see there for the options)."""
        return Gossip(self, self.group("gossip"), graph, **kwargs)

    # ---- lifecycle ------------------------------------------------------------------------------
    def barrier(self) -> None:
        _barrier(self._world_group.op("barrier"))

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> "World":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
