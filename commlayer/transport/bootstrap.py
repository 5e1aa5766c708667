"""Bring a transport up over a c10d store: listen, swap endpoints, connect, handshake."""

from __future__ import annotations

import os
import time
from typing import Any

from commlayer.transport import envelope
from commlayer.transport.config import TransportConfig
from commlayer.transport.endpoints import choose_host, exchange_endpoints
from commlayer.transport.engine import Transport
from commlayer.transport.errors import CommError, CommTimeout
from commlayer.transport.security import credentials
from commlayer.transport.wire import Kind

_HELLO = "__hello__"


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


def handshake(t: Transport, timeout: float) -> None:
    """Exchanges HELLO with every peer of ``t``, proving both directions work before the first op."""
    peers = t._peers
    for p in peers:
        t.send(p, envelope.control(Kind.HELLO, _HELLO, t.rank, meta={"world_size": t.world_size, "nonce": t.nonce}), [])
    deadline = time.monotonic() + timeout
    for p in peers:
        try:
            msg = t.recv(_HELLO, 0, 0, 0, p, max(0.0, deadline - time.monotonic()), "connection handshake")
        except CommTimeout:
            missing = [q for q in peers if peers[q].msgs_recv == 0]
            raise CommTimeout(f"rank {t.rank} ({t.name}): no handshake from ranks {missing} within {timeout:.0f} s; "
                              f"this rank connects to " + ", ".join(f"{q}->{peers[q].endpoint}" for q in missing)
                              + ". Check COMMLAYER_HOST on those ranks, firewalls and COMMLAYER_CONNECT_OVERRIDES") from None
        if msg.header.meta.get("world_size") != t.world_size:
            raise CommError(f"rank {p} runs with world_size {msg.header.meta.get('world_size')}, this rank with {t.world_size}")
    t.release_ipc_path()  # every peer's HELLO came over its connection to us: nobody needs the path any more
