"""What a topology needs of its world: the surface :class:`~commlayer.topologies.world.World` offers.

Topologies (``Collective``, ``Gossip``, ``ParameterServer``) run over a world and ``World`` builds
them, so the topologies see the world through this protocol instead of importing ``world.py``:
the world sits above the topologies it makes, and nothing below imports it.
"""

from __future__ import annotations

from typing import Callable, Protocol

from commlayer.transport.engine import Transport


class WorldView(Protocol):
    """The ranks of a job over one connected transport.

    Attributes:
        rank: this process's rank.
        size: number of ranks.
        seed: job seed shared by all ranks (codec randomness, random graphs).
        timeout: seconds for every wait.
        transport: the connected transport.
        dead: ranks known to have failed or shut down.
    """

    rank: int
    size: int
    seed: int
    timeout: float
    transport: Transport
    dead: set[int]

    def alive(self) -> list[bool]:
        """Per rank: not known dead."""
        ...

    def on_failure(self, callback: Callable[[int], None]) -> None:
        """``callback(rank)`` when a rank dies or shuts down."""
        ...
