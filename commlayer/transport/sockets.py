"""Construction of the transport's ZeroMQ sockets: limits and security set in one place.

Liveness is judged by commlayer.transport.heartbeat (adaptive, on a control connection), not by ZMTP heartbeats,
which would drop a connection whose heartbeat waits behind a full bottleneck queue.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import zmq

from commlayer.transport.config import TransportConfig
from commlayer.transport.errors import CommError
from commlayer.transport.flow import SendQueue
from commlayer.transport.security import Credentials, secure_dealer, secure_server
from commlayer.transport.wire import MAX_HEADER_BYTES, PART_BYTES, split_frames

MONITOR_EVENTS = (zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                  | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)


@dataclass
class Peer:
    """One peer of the transport: its DEALER and control DEALER, connection and liveness state, send queue, counters."""

    rank: int
    endpoint: str
    sock: zmq.Socket
    monitor: zmq.Socket | None
    lock: threading.Lock = field(default_factory=threading.Lock)
    state: str = "connecting"  # connecting | connected | left | dead
    suspect_since: float = 0.0  # deadline after which a dropped connection / exited process counts as dead (0 = none)
    suspect_why: str = ""
    leaving: float = 0.0  # when its early goodbye (on the control connection) arrived
    leave_why: str = ""
    leave_failed: Any = None  # the first failed rank its early goodbye named (None: none)
    leave_sent: int = -1  # data messages it had sent to this rank when it said goodbye (-1: not said)
    ctrl: zmq.Socket | None = None  # control connection (heartbeats), see heartbeat.py
    ctrl_lock: threading.Lock = field(default_factory=threading.Lock)
    live: Any = None  # liveness.PeerLive
    queue: SendQueue = field(default_factory=lambda: SendQueue(0))  # flow control towards the peer (flow.py)
    shm_ok: bool = False  # co-located: large payloads may go through shared memory
    shm_out: Any = None  # shm.Producer towards the peer (made on the first large payload)
    shm_in: Any = None  # shm.Consumer of the peer's ring towards us (opened on first use)
    bytes_sent: int = 0
    bytes_recv: int = 0
    msgs_sent: int = 0
    msgs_recv: int = 0

    def stats(self, liveness: Any) -> dict[str, Any]:
        """Endpoint, state, counters, send-queue figures and (with ``liveness``, its config) the silence timeout and srtt."""
        live = self.live
        return {"endpoint": self.endpoint, "state": self.state, "bytes_sent": self.bytes_sent, "bytes_recv": self.bytes_recv,
                "msgs_sent": self.msgs_sent, "msgs_recv": self.msgs_recv, "queued_bytes": self.queue.queued,
                "queue_peak_bytes": self.queue.peak, "queue_waits": self.queue.waits,
                "live_timeout_s": live.timeout(liveness) if live else None, "srtt_s": live.rtt.srtt if live else None}


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
    secure_server(sock, creds)
    return sock


def dealer_socket(ctx: zmq.Context, config: TransportConfig, creds: Credentials, me: int, peer: int,
                  published_key: str, ident: str = "r") -> zmq.Socket:
    """The DEALER towards ``peer``, identified as ``<ident><me>`` (``r``: data, ``c``: control connection) and
    secured as ``peer``'s listener requires (the same credentials for both connections).

    Raises:
        CommError: this rank cannot meet the peer's security (different secret, encryption on one side).
    """
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, f"{ident}{me}".encode())
    sock.setsockopt(zmq.SNDHWM, config.hwm)
    if config.sockbuf:
        sock.setsockopt(zmq.SNDBUF, config.sockbuf)
    sock.setsockopt(zmq.LINGER, int(config.linger * 1000))
    sock.setsockopt(zmq.SNDTIMEO, int(config.timeout * 1000))
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    try:
        secure_dealer(sock, creds, me, peer, published_key)
    except ConnectionRefusedError as exc:
        raise CommError(f"rank {me} refuses to connect to rank {peer}: {exc}") from None
    return sock


def send_frames(sock: zmq.Socket, header: bytes, frames: Sequence[Any], copy_threshold: int,
                track: bool) -> tuple[list[Any], Any]:
    """Writes one message: the packed header, then the payloads cut into wire parts. Parts of at least
    ``copy_threshold`` bytes go zero-copy and tracked. Caller holds the socket's lock.

    Returns:
        (the trackers of the zero-copy parts when ``track``, else [];
        the tracker of the last zero-copy part or None, for the flow control of :mod:`commlayer.transport.flow`).

    Raises:
        zmq.Again: the peer's queue stayed full for the socket's send timeout.
    """
    parts = split_frames(frames, PART_BYTES)
    n = len(parts)
    trackers = []
    last = None
    sock.send(header, zmq.SNDMORE if n else 0)
    for i, f in enumerate(parts):
        big = (len(f) if isinstance(f, (bytes, bytearray)) else memoryview(f).nbytes) >= copy_threshold
        flags = zmq.SNDMORE if i < n - 1 else 0
        if big:
            last = sock.send(f, flags, copy=False, track=True)
            if track:
                trackers.append(last)
        else:
            sock.send(f, flags, copy=True)
    return trackers, last
