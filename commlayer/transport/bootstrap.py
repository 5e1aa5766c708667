"""Bring a transport up over a c10d store: listen, swap endpoints, connect, handshake."""

from __future__ import annotations

from typing import Any

from commlayer.transport.config import TransportConfig
from commlayer.transport.endpoints import exchange_endpoints
from commlayer.transport.engine import Transport


def connect_transport(store: Any, rank: int, size: int, timeout: float, name: str,
                      prefix: str = "commlayer/ep") -> Transport:
    """A connected transport for ``rank`` of ``size`` (closed again if any step fails).

    Args:
        store: a c10d store shared by the ranks (torchrun's TCPStore, or any PrefixStore).
        timeout: seconds for the endpoint exchange and the handshake.
        name: label for messages.
        prefix: store key prefix of the endpoint records.
    """
    t = Transport(rank, size, TransportConfig.from_env(timeout=timeout), name=name)
    try:
        info = t.listen()
        peers = exchange_endpoints(store, rank, size, info, timeout, prefix=prefix) if size > 1 else {rank: info}
        t.connect(peers)
        if size > 1:
            t.handshake(timeout)
    except BaseException:
        t.close()
        raise
    return t
