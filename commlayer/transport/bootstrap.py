"""Bring a transport up over a c10d store: listen, swap endpoints, connect, handshake."""

from __future__ import annotations

import os
from typing import Any

from commlayer.transport.config import TransportConfig
from commlayer.transport.endpoints import choose_host, exchange_endpoints
from commlayer.transport.engine import Transport
from commlayer.transport.security import credentials


def connect_transport(store: Any, rank: int, size: int, timeout: float, name: str,
                      prefix: str = "commlayer/ep") -> Transport:
    """A connected transport for ``rank`` of ``size`` (closed again if any step fails).

    Args:
        store: a c10d store shared by the ranks (torchrun's TCPStore, or any PrefixStore); it also
            carries the job key that authenticates the ranks when no secret is configured.
        timeout: seconds for the endpoint exchange and the handshake.
        name: label for messages.
        prefix: store key prefix of the endpoint records.
    """
    prefix = scoped_prefix(store, prefix, rank, size)
    creds = credentials(store, rank, size, choose_host(), prefix, timeout)
    t = Transport(rank, size, TransportConfig.from_env(timeout=timeout), name=name, creds=creds)
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


def scoped_prefix(store: Any, prefix: str, rank: int, size: int) -> str:
    """``prefix`` scoped to this attempt of the job, so a restarted rank never reads a dead attempt's records.

    torchrun keeps its store across elastic restarts and sets ``TORCHELASTIC_RESTART_COUNT``: each
    attempt publishes under its own key space. Any other reuse of a store (a second group over the
    same keys) is detected by a join counter and fails fast instead of dialling dead endpoints.

    Raises:
        RuntimeError: more than ``size`` ranks joined this key space.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or "0"
    scoped = f"{prefix}/attempt{attempt}"
    joined = int(store.add(f"{scoped}/joined", 1))
    if joined > size:
        raise RuntimeError(f"rank {rank}: the c10d store already holds commlayer endpoint records of an earlier group of "
                           f"{size} ranks under {scoped!r} (this is join #{joined}); a restarted job must rendezvous over a "
                           "fresh store (torchrun sets TORCHELASTIC_RESTART_COUNT for this), or use another store prefix")
    return scoped

