"""The attributes the transport's mixins (:mod:`~commlayer.transport.heartbeat`,
:mod:`~commlayer.transport.shutdown`) share with :class:`commlayer.transport.engine.Transport`, declared for
the type checker; the transport's ``__init__`` sets them."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable

import zmq

from commlayer.transport.config import TransportConfig
from commlayer.transport.endpoints import EndpointInfo
from commlayer.transport.mailbox import Mailbox
from commlayer.transport.receive import Receiver
from commlayer.transport.security import Credentials
from commlayer.transport.sockets import Peer


class TransportState:
    """Declarations only: no behaviour, nothing set at runtime."""

    rank: int
    world_size: int
    config: TransportConfig
    creds: Credentials
    mailbox: Mailbox
    endpoint: EndpointInfo | None
    first_failure: int | None
    _ctx: zmq.Context
    _router: zmq.Socket
    _auth: Any
    _peers: dict[int, Peer]
    _listeners: list[Callable[[int, str], None]]
    _close_hooks: list[Callable[[], None]]
    _rx: Receiver
    _closing: threading.Event
    _closed: bool
    _close_lock: threading.Lock
    _listen_port: int
    _shared_hosts: set[str]

    if TYPE_CHECKING:
        def _say_goodbye_early(self, meta: dict[str, Any]) -> None: ...
        def _live_close(self) -> None: ...
        def release_ipc_path(self) -> None: ...
