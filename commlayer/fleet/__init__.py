"""Elastic fleets of weakly connected peers: DiLoCo-style delayed sync with peers that join, leave and lag.

Membership, rendezvous and the round ledger live in torch's c10d store (``TCPStore``, what torchrun
uses), as sealed records (authenticated always, encrypted off loopback: :mod:`commlayer.fleet.seal`);
a joining peer fetches the model and outer-optimizer state from a live peer over CurveZMQ
(:mod:`commlayer.fleet.statesync`), through a relay when it cannot reach it directly
(:mod:`commlayer.fleet.relay`). See docs/fleet.md.
"""

from commlayer.fleet.config import FleetConfig
from commlayer.fleet.peer import FleetPeer

__all__ = ["FleetConfig", "FleetPeer"]
