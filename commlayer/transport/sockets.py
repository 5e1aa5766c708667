"""Construction of the transport's ZeroMQ sockets: limits, heartbeats and security set in one place."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import zmq

from commlayer.transport.config import TransportConfig
from commlayer.transport.errors import CommError
from commlayer.transport.security import Credentials, secure_dealer, secure_server
from commlayer.transport.wire import MAX_HEADER_BYTES, PART_BYTES, split_frames

MONITOR_EVENTS = (zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                  | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)


@dataclass
class Peer:
    """One peer of the transport: its DEALER, connection state and counters."""

    rank: int
    endpoint: str
    sock: zmq.Socket
    monitor: zmq.Socket | None
    lock: threading.Lock = field(default_factory=threading.Lock)
    state: str = "connecting"  # connecting | connected | left | dead
    suspect_since: float = 0.0  # when its connection dropped (0 = not suspected)
    shm_ok: bool = False  # co-located: large payloads may go through shared memory
    shm_out: Any = None  # shm.Producer towards the peer (made on the first large payload)
    shm_in: Any = None  # shm.Consumer of the peer's ring towards us (opened on first use)
    bytes_sent: int = 0
    bytes_recv: int = 0
    msgs_sent: int = 0
    msgs_recv: int = 0


def set_heartbeat(sock: zmq.Socket, config: TransportConfig) -> None:
    ivl = max(1, int(config.heartbeat * 1000))
    sock.setsockopt(zmq.HEARTBEAT_IVL, ivl)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, ivl)
    sock.setsockopt(zmq.HEARTBEAT_TTL, 2 * ivl)


def router_socket(ctx: zmq.Context, config: TransportConfig, creds: Credentials) -> zmq.Socket:
    """The listening ROUTER: requires ``creds``' mechanism before any message, caps every frame."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, config.hwm)
    if config.sockbuf:
        sock.setsockopt(zmq.RCVBUF, config.sockbuf)
    # No frame larger than a wire part is accepted from anyone, before or after the handshake: a
    # stranger's declared size never makes this rank allocate more than that.
    # (The slack covers CurveZMQ's per-frame box overhead: an encrypted part is a few bytes longer.)
    sock.setsockopt(zmq.MAXMSGSIZE, max(PART_BYTES, MAX_HEADER_BYTES) + 4096)
    set_heartbeat(sock, config)
    secure_server(sock, creds)
    return sock


def dealer_socket(ctx: zmq.Context, config: TransportConfig, creds: Credentials, me: int, peer: int,
                  published_key: str) -> zmq.Socket:
    """The DEALER towards ``peer``, identified as ``r<me>`` and secured as ``peer``'s listener requires.

    Raises:
        CommError: this rank cannot meet the peer's security (different secret, encryption on one side).
    """
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, f"r{me}".encode())
    sock.setsockopt(zmq.SNDHWM, config.hwm)
    if config.sockbuf:
        sock.setsockopt(zmq.SNDBUF, config.sockbuf)
    sock.setsockopt(zmq.LINGER, int(config.linger * 1000))
    sock.setsockopt(zmq.SNDTIMEO, int(config.timeout * 1000))
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    set_heartbeat(sock, config)
    try:
        secure_dealer(sock, creds, me, peer, published_key)
    except ConnectionRefusedError as exc:
        raise CommError(f"rank {me} refuses to connect to rank {peer}: {exc}") from None
    return sock


def send_frames(sock: zmq.Socket, header: bytes, frames: Sequence[Any], copy_threshold: int, track: bool) -> list[Any]:
    """Writes one message: the packed header, then the payloads cut into wire parts. Parts of at least
    ``copy_threshold`` bytes go zero-copy; with ``track`` their trackers are returned. Caller holds the socket's lock.

    Raises:
        zmq.Again: the peer's queue stayed full for the socket's send timeout.
    """
    parts = split_frames(frames, PART_BYTES)
    n = len(parts)
    trackers = []
    sock.send(header, zmq.SNDMORE if n else 0)
    for i, f in enumerate(parts):
        big = (len(f) if isinstance(f, (bytes, bytearray)) else memoryview(f).nbytes) >= copy_threshold
        flags = zmq.SNDMORE if i < n - 1 else 0
        if big and track:
            trackers.append(sock.send(f, flags, copy=False, track=True))
        else:
            sock.send(f, flags, copy=not big)
    return trackers
