"""The ZeroMQ transport: one listening ROUTER per rank, one DEALER per peer, a background I/O thread.

Outgoing messages are written by the calling thread straight into the peer's DEALER (guarded by
a lock); ZeroMQ's own I/O thread does the socket work. Incoming messages are read by one
background thread, validated, and delivered into the :class:`Mailbox`, where operations pick
them up with timeouts. Peer failure is detected from socket events (disconnect), a pidfd per
co-located peer and adaptive heartbeats on a separate control connection
(:mod:`commlayer.transport.heartbeat`), and fails every wait that needs the peer.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import zmq

from commlayer.transport.config import TransportConfig
from commlayer.transport.endpoints import EndpointInfo, choose_host, connect_overrides, host_id, ipc_path
from commlayer.transport.errors import CommError, CommTimeout, PeerFailure, TransportClosed
from commlayer.transport.flow import SendQueue
from commlayer.transport.heartbeat import Heartbeats
from commlayer.transport.mailbox import Mailbox, Message
from commlayer.transport.receive import Receiver
from commlayer.transport.shutdown import Shutdown
from commlayer.transport import shm
from commlayer.transport.security import CurveKeys, keys_from_env, secure_client, secure_server, start_authenticator
from commlayer.transport.wire import Header, Kind

logger = logging.getLogger(__name__)

_HELLO = "__hello__"


@dataclass
class _Peer:
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
    ctrl: zmq.Socket | None = None  # control connection (heartbeats), see heartbeat.py
    ctrl_lock: threading.Lock = field(default_factory=threading.Lock)
    live: Any = None  # liveness.PeerLive
    queue: SendQueue = field(default_factory=lambda: SendQueue(0))
    shm_ok: bool = False  # co-located: large payloads may go through shared memory
    shm_out: Any = None  # shm.Producer towards the peer (made on the first large payload)
    shm_in: Any = None  # shm.Consumer of the peer's ring towards us (opened on first use)
    bytes_sent: int = 0
    bytes_recv: int = 0
    msgs_sent: int = 0
    msgs_recv: int = 0


class Transport(Receiver, Heartbeats, Shutdown):
    """Moves byte frames between the ranks of one job.

    Args:
        rank: this process's global rank.
        world_size: number of ranks.
        config: transport knobs.
        name: label used in log and error messages.
    """

    def __init__(self, rank: int, world_size: int, config: TransportConfig | None = None, name: str = "commlayer",
                 curve: CurveKeys | None = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"Expected 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.rank = rank
        self.world_size = world_size
        self.config = config or TransportConfig.from_env()
        self.name = name
        self.nonce = uuid.uuid4().hex[:12]
        self.mailbox = Mailbox(self.config.mailbox_bytes, self.config.mailbox_messages)
        self.rejected = 0
        self._ctx = zmq.Context(io_threads=1)
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.RCVHWM, self.config.hwm)
        if self.config.sockbuf:
            self._router.setsockopt(zmq.RCVBUF, self.config.sockbuf)
        self._router.setsockopt(zmq.MAXMSGSIZE, -1)
        self.curve = curve if curve is not None else keys_from_env(rank, world_size)
        self._auth = start_authenticator(self._ctx, self.curve) if self.curve is not None else None
        if self.curve is not None:
            secure_server(self._router, self.curve)
        self._peers: dict[int, _Peer] = {}
        self._listeners: list[Callable[[int, str], None]] = []
        self._io_thread: threading.Thread | None = None
        self._ctrl_send: zmq.Socket | None = None
        self._wake_send: zmq.Socket | None = None
        self._wake_lock = threading.Lock()
        self._rx_lock = threading.Lock()
        self._rx_demand = 0
        self._last_demand = 0.0
        self._io_idle = False
        self._closing = threading.Event()
        self._closed = False
        self._close_lock = threading.Lock()
        self._ipc_file = ""
        self._listen_port = 0
        self._shared_hosts: set[str] = set()
        # Passive measurement hooks (commlayer.adapt): called as observer(peer, nbytes, seconds).
        # on_recv: seconds the receiver waited for a message of nbytes; on_send: seconds spent queueing it.
        self.on_recv: Callable[[int, int, float], None] | None = None
        self.on_send: Callable[[int, int, float], None] | None = None
        self.endpoint: EndpointInfo | None = None
        self.peer_info: dict[int, EndpointInfo] = {}

    # ---- setup ----------------------------------------------------------------------------
    def listen(self) -> EndpointInfo:
        """Binds the listening socket (TCP, plus IPC for co-located peers)."""
        host = choose_host()
        port = self.config.port
        addr = f"tcp://{host}:{port if port else '*'}"
        try:
            self._router.bind(addr)
        except zmq.ZMQError as exc:
            raise CommError(
                f"rank {self.rank} could not listen on {addr} ({exc}): "
                + ("another process (an earlier job, or a second init_process_group in this one) holds the port; "
                   "set COMMLAYER_PORT to a free port or unset it to pick one" if exc.errno == zmq.EADDRINUSE
                   else "set COMMLAYER_HOST to an address of this machine")) from None
        tcp = self._router.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._listen_port = int(tcp.rsplit(":", 1)[1])
        ipc = ""
        if self.config.ipc:
            self._ipc_file = ipc_path(self.rank)
            try:
                self._router.bind(f"ipc://{self._ipc_file}")
                ipc = f"ipc://{self._ipc_file}"
            except zmq.ZMQError as exc:  # e.g. no writable /tmp: TCP still works
                logger.info("rank %d: no ipc endpoint (%s); co-located peers use TCP", self.rank, exc)
                self._ipc_file = ""
        if self.curve is None and not host.startswith("127.") and host != "localhost":
            logger.warning("rank %d LISTENS ON %s WITHOUT ENCRYPTION: anyone who can reach this port can read and inject "
                           "gradients. Set COMMLAYER_SECRET (same value on every rank) to encrypt and authenticate peers",
                           self.rank, tcp)
        pub = self.curve.public.decode() if self.curve is not None else ""
        self.endpoint = EndpointInfo(self.rank, tcp, ipc, host_id(), os.getpid(), self.nonce, pub)
        return self.endpoint

    def connect(self, endpoints: dict[int, EndpointInfo]) -> None:
        """Connects one DEALER to every peer and starts the I/O thread."""
        if self.endpoint is None:
            raise RuntimeError("Expected listen() before connect()")
        self.peer_info = dict(endpoints)
        overrides = connect_overrides()
        for p, info in sorted(endpoints.items()):
            if p == self.rank:
                continue
            if p in overrides:
                ep = overrides[p]
            elif info.ipc and info.host_id == self.endpoint.host_id:
                ep = info.ipc
            else:
                ep = info.tcp
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.ROUTING_ID, f"r{self.rank}".encode())
            sock.setsockopt(zmq.SNDHWM, self.config.hwm)
            if self.config.sockbuf:
                sock.setsockopt(zmq.SNDBUF, self.config.sockbuf)
            sock.setsockopt(zmq.LINGER, int(self.config.linger * 1000))
            sock.setsockopt(zmq.SNDTIMEO, int(self.config.timeout * 1000))
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            server_key = None
            if self.curve is not None:
                try:
                    server_key = self.curve.check_peer(p, info.curve_public)
                    secure_client(sock, self.curve, server_key)
                except ConnectionRefusedError as exc:
                    sock.close(linger=0)
                    raise CommError(f"rank {self.rank} refuses to connect to rank {p}: {exc}") from None
            elif info.curve_public:
                sock.close(linger=0)
                raise CommError(f"rank {p} requires encryption but this rank has no keys; set the same COMMLAYER_SECRET on every rank")
            monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                              | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
            sock.connect(ep)
            self._peers[p] = _Peer(p, ep, sock, monitor, queue=SendQueue(self.config.send_queue_bytes))
            self._peers[p].shm_ok = ep == info.ipc and bool(self.config.shm_bytes) and shm.available()
            self._live_peer(self._peers[p], info, ep, server_key)
        hosts = [x.live.host for x in self._peers.values() if x.live.host]
        self._shared_hosts = {h for h in hosts if hosts.count(h) > 1}
        ctrl_recv, self._ctrl_send = self._pair("ctrl")
        wake_recv, self._wake_send = self._pair("wake")
        self._io_thread = threading.Thread(target=self._io_loop, args=(ctrl_recv, wake_recv), name=f"commlayer-io-{self.rank}",
                                           daemon=True)
        self._io_thread.start()

    def _pair(self, name: str) -> tuple[zmq.Socket, zmq.Socket]:
        a = self._ctx.socket(zmq.PAIR)
        a.bind(f"inproc://{name}-{self.nonce}")
        b = self._ctx.socket(zmq.PAIR)
        b.connect(f"inproc://{name}-{self.nonce}")
        return a, b

    def handshake(self, timeout: float) -> None:
        """Exchanges HELLO with every peer, proving both directions work before the first op."""
        for p in self._peers:
            self.send(p, Header(Kind.HELLO, "hello", _HELLO, 0, 0, 0, self.rank,
                                meta={"world_size": self.world_size, "nonce": self.nonce}), [])
        deadline = time.monotonic() + timeout
        for p in self._peers:
            try:
                msg = self.recv(_HELLO, 0, 0, 0, p, max(0.0, deadline - time.monotonic()), "connection handshake")
            except CommTimeout:
                missing = [q for q in self._peers if self._peers[q].msgs_recv == 0]
                raise CommTimeout(f"rank {self.rank} ({self.name}): no handshake from ranks {missing} within {timeout:.0f} s; "
                                  f"this rank connects to " + ", ".join(f"{q}->{self._peers[q].endpoint}" for q in missing)
                                  + ". Check COMMLAYER_HOST on those ranks, firewalls and COMMLAYER_CONNECT_OVERRIDES") from None
            if msg.header.meta.get("world_size") != self.world_size:
                raise CommError(f"rank {p} runs with world_size {msg.header.meta.get('world_size')}, this rank with {self.world_size}")

    # ---- data path ------------------------------------------------------------------------
    def send(self, peer: int, header: Header, frames: Sequence[Any], track: bool = False) -> list[zmq.MessageTracker]:
        """Sends a header and raw frames to ``peer``; large frames go zero-copy.

        The caller must not modify a zero-copy buffer until the peer has received it (a later
        reply proves that) or, with ``track=True``, until the returned trackers are done.
        """
        if peer == self.rank:
            self.mailbox.deliver(Message(header, [memoryview(f).cast("B") if not isinstance(f, bytes) else f for f in frames]))
            return []
        p = self._peers.get(peer)
        if p is None:
            raise ValueError(f"Expected a peer rank in [0, {self.world_size}), got {peer}")
        if p.state in ("dead", "left") or self._closing.is_set():
            if self._closing.is_set():
                raise TransportClosed(f"{header.op} #{header.seq}: the transport of rank {self.rank} is shut down")
            raise PeerFailure(f"{header.op} #{header.seq} in {header.channel!r}: cannot send to rank {peer}, it "
                              + ("shut down" if p.state == "left" else "failed"), peer=peer)
        if frames and not header.nbytes:
            header = _with_sizes(header, frames)
        if p.shm_ok and frames and sum(header.nbytes) >= self.config.shm_min:
            with p.lock:
                if p.shm_out is None:
                    try:
                        p.shm_out = shm.Producer(shm.ring_path(os.getpid(), self.nonce, self.rank, peer), self.config.shm_bytes)
                    except OSError as exc:  # e.g. no room in /dev/shm: the socket carries everything
                        logger.info("rank %d: no shared-memory ring to rank %d (%s)", self.rank, peer, exc)
                        p.shm_ok = False
                starts = p.shm_out.put(list(frames)) if p.shm_out is not None else None
            if starts is not None:  # copied: only the descriptor crosses the socket
                header = replace(header, meta={**header.meta, "shm": starts})
                frames = ()
        hdr = header.pack()
        t0 = time.monotonic()
        trackers: list[zmq.MessageTracker] = []
        threshold = self.config.copy_threshold
        n = len(frames)
        big_bytes = sum(nb for nb in header.nbytes if nb >= threshold)
        if big_bytes:  # flow control: wait while too much is queued towards this peer
            p.queue.admit(big_bytes, t0 + self.config.timeout, lambda: self._check_sendable(p, header),
                          f"{header.op} #{header.seq}: sending to rank {peer}")
        last = None
        with p.lock:
            try:
                p.sock.send(hdr, zmq.SNDMORE if n else 0)
                for i, f in enumerate(frames):
                    big = len(f) >= threshold if isinstance(f, (bytes, bytearray)) else memoryview(f).nbytes >= threshold
                    flags = zmq.SNDMORE if i < n - 1 else 0
                    if big:
                        last = p.sock.send(f, flags, copy=False, track=True)
                        if track:
                            trackers.append(last)
                    else:
                        p.sock.send(f, flags, copy=True)
            except zmq.Again:
                raise CommTimeout(f"{header.op} #{header.seq}: sending to rank {peer} blocked for {self.config.timeout:.0f} s "
                                  f"({self.config.hwm} messages queued); rank {peer} is not receiving") from None
            p.msgs_sent += 1
            p.bytes_sent += sum(header.nbytes)
        if last is not None:
            p.queue.add(last, big_bytes)
        if self.on_send is not None:
            self.on_send(peer, sum(header.nbytes), time.monotonic() - t0)
        return trackers

    @property
    def all_local(self) -> bool:
        """True when every peer is on this machine (reached over ipc://, with shared memory)."""
        return all(p.endpoint.startswith("ipc://") for p in self._peers.values())

    def add_failure_listener(self, callback: Callable[[int, str], None]) -> None:
        """``callback(peer, reason)`` runs (on the I/O thread) when a peer fails."""
        self._listeners.append(callback)

    def remove_failure_listener(self, callback: Callable[[int, str], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def _check_sendable(self, p: _Peer, header: Header) -> None:
        if self._closing.is_set():
            raise TransportClosed(f"{header.op} #{header.seq}: the transport of rank {self.rank} is shut down")
        if p.state in ("dead", "left"):
            raise PeerFailure(f"{header.op} #{header.seq} in {header.channel!r}: cannot send to rank {p.rank}, it "
                              + ("shut down" if p.state == "left" else "failed"), peer=p.rank)

    def peer_stats(self) -> dict[int, dict[str, Any]]:
        return {p: {"endpoint": x.endpoint, "state": x.state, "bytes_sent": x.bytes_sent, "bytes_recv": x.bytes_recv,
                    "msgs_sent": x.msgs_sent, "msgs_recv": x.msgs_recv, "queued_bytes": x.queue.queued,
                    "queue_peak_bytes": x.queue.peak, "queue_waits": x.queue.waits,
                    "live_timeout_s": x.live.timeout(self.liveness) if x.live else None,
                    "srtt_s": x.live.rtt.srtt if x.live else None} for p, x in self._peers.items()}

    @property
    def closed(self) -> bool:
        return self._closed


def _with_sizes(header: Header, frames: Sequence[Any]) -> Header:
    return replace(header, nbytes=tuple(f.nbytes if isinstance(f, memoryview) else len(f) if isinstance(f, (bytes, bytearray))
                                        else memoryview(f).nbytes for f in frames))
