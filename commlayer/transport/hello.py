"""The connection handshake: HELLO to every peer, proving both directions work before the first op.

Lives below :mod:`commlayer.transport.engine` (which calls it from ``Transport.handshake``) and
reaches the transport only through the small :class:`HelloTransport` surface, so neither module
imports the other's caller.
"""

from __future__ import annotations

import time
from typing import Any, Protocol, Sequence

from commlayer.transport import envelope
from commlayer.transport.errors import CommError, CommTimeout
from commlayer.transport.flush import Flush
from commlayer.transport.mailbox import Message
from commlayer.transport.sockets import Peer
from commlayer.transport.wire import Header, Kind

HELLO = "__hello__"


class HelloTransport(Protocol):
    """What the handshake needs of a transport (``commlayer.transport.engine.Transport`` has it)."""

    rank: int
    world_size: int
    name: str
    nonce: str
    _peers: dict[int, Peer]

    def send(self, peer: int, header: Header, frames: Sequence[Any], track: bool = False) -> Flush: ...

    def recv(self, channel: str, seq: int, step: int, chunk: int, src: int, timeout: float | None = None,
             what: str = "") -> Message: ...

    def release_ipc_path(self) -> None: ...


def handshake(t: HelloTransport, timeout: float) -> None:
    """Exchanges HELLO with every peer of ``t``, proving both directions work before the first op."""
    peers = t._peers
    for p in peers:
        t.send(p, envelope.control(Kind.HELLO, HELLO, t.rank, meta={"world_size": t.world_size, "nonce": t.nonce}), [])
    deadline = time.monotonic() + timeout
    for p in peers:
        try:
            msg = t.recv(HELLO, 0, 0, 0, p, max(0.0, deadline - time.monotonic()), "connection handshake")
        except CommTimeout:
            missing = [q for q in peers if peers[q].msgs_recv == 0]
            raise CommTimeout(f"rank {t.rank} ({t.name}): no handshake from ranks {missing} within {timeout:.0f} s; "
                              f"this rank connects to " + ", ".join(f"{q}->{peers[q].endpoint}" for q in missing)
                              + ". Check COMMLAYER_HOST on those ranks, firewalls and COMMLAYER_CONNECT_OVERRIDES") from None
        if msg.header.meta.get("world_size") != t.world_size:
            raise CommError(f"rank {p} runs with world_size {msg.header.meta.get('world_size')}, this rank with {t.world_size}")
    t.release_ipc_path()  # every peer's HELLO came over its connection to us: nobody needs the path any more
