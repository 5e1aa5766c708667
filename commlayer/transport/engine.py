"""The ZeroMQ transport: one listening ROUTER per rank, one DEALER per peer, a background I/O thread.

Outgoing messages are written by the calling thread straight into the peer's DEALER (guarded by
a lock); ZeroMQ's own I/O thread does the socket work. Incoming messages are read by one
background thread, validated, and delivered into the :class:`Mailbox`, where operations pick
them up with timeouts. Peer failure is detected from socket events (disconnect, heartbeat
expiry) and fails every wait that needs the peer.
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
from zmq.utils.monitor import recv_monitor_message

from commlayer.transport.config import TransportConfig
from commlayer.transport.endpoints import EndpointInfo, choose_host, connect_overrides, host_id, ipc_path
from commlayer.transport.errors import CommError, CommTimeout, PeerFailure, TransportClosed, WireError
from commlayer.transport.mailbox import Mailbox, Message, timeout_error
from commlayer.transport import shm
from commlayer.transport.security import CurveKeys, keys_from_env, secure_client, secure_server, start_authenticator, user_id
from commlayer.transport.wire import Header, Kind, check_frames, unpack_header

logger = logging.getLogger(__name__)

_HELLO = "__hello__"
DISCONNECT_GRACE = 0.25


@dataclass
class _Peer:
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


class Transport:
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
        self._set_heartbeat(self._router)
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
        # Passive measurement hooks (commlayer.adapt): called as observer(peer, nbytes, seconds).
        # on_recv: seconds the receiver waited for a message of nbytes; on_send: seconds spent queueing it.
        self.on_recv: Callable[[int, int, float], None] | None = None
        self.on_send: Callable[[int, int, float], None] | None = None
        self.endpoint: EndpointInfo | None = None
        self.peer_info: dict[int, EndpointInfo] = {}

    def _set_heartbeat(self, sock: zmq.Socket) -> None:
        ivl = max(1, int(self.config.heartbeat * 1000))
        sock.setsockopt(zmq.HEARTBEAT_IVL, ivl)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, ivl)
        sock.setsockopt(zmq.HEARTBEAT_TTL, 2 * ivl)

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
            self._set_heartbeat(sock)
            if self.curve is not None:
                try:
                    secure_client(sock, self.curve, self.curve.check_peer(p, info.curve_public))
                except ConnectionRefusedError as exc:
                    sock.close(linger=0)
                    raise CommError(f"rank {self.rank} refuses to connect to rank {p}: {exc}") from None
            elif info.curve_public:
                sock.close(linger=0)
                raise CommError(f"rank {p} requires encryption but this rank has no keys; set the same COMMLAYER_SECRET on every rank")
            monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                              | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
            sock.connect(ep)
            self._peers[p] = _Peer(p, ep, sock, monitor)
            self._peers[p].shm_ok = ep == info.ipc and bool(self.config.shm_bytes) and shm.available()
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
        with p.lock:
            try:
                p.sock.send(hdr, zmq.SNDMORE if n else 0)
                for i, f in enumerate(frames):
                    big = len(f) >= threshold if isinstance(f, (bytes, bytearray)) else memoryview(f).nbytes >= threshold
                    flags = zmq.SNDMORE if i < n - 1 else 0
                    if big and track:
                        trackers.append(p.sock.send(f, flags, copy=False, track=True))
                    else:
                        p.sock.send(f, flags, copy=not big)
            except zmq.Again:
                raise CommTimeout(f"{header.op} #{header.seq}: sending to rank {peer} blocked for {self.config.timeout:.0f} s "
                                  f"({self.config.hwm} messages queued); rank {peer} is not receiving") from None
            p.msgs_sent += 1
            p.bytes_sent += sum(header.nbytes)
        if self.on_send is not None:
            self.on_send(peer, sum(header.nbytes), time.monotonic() - t0)
        return trackers

    def recv(self, channel: str, seq: int, step: int, chunk: int, src: int, timeout: float | None = None,
             what: str = "") -> Message:
        """Waits for the message (channel, seq, step, chunk) from ``src``.

        The waiting thread reads the socket itself when no other thread does (leader/follower):
        no thread hand-off on the critical path of a collective.
        """
        key = (channel, seq, step, chunk, src)
        what = what or f"{channel} #{seq} step {step}"
        timeout = self.config.timeout if timeout is None else timeout
        msg = self.mailbox.try_take(key, what)
        if msg is None:
            t0 = time.monotonic()
            msg = self._recv_wait(key, src, timeout, what, t0 + timeout)
            if self.on_recv is not None:
                self.on_recv(src, msg.nbytes, time.monotonic() - t0)
        elif self.on_recv is not None:
            self.on_recv(src, msg.nbytes, 0.0)
        return msg

    def _recv_wait(self, key: tuple, src: int, timeout: float, what: str, deadline: float) -> Message:
        mb = self.mailbox
        self._want_rx(+1)
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise timeout_error(what, src, timeout)
                if self._rx_lock.acquire(timeout=min(remaining, 0.05)):
                    try:
                        msg = mb.try_take(key, what)
                        if msg is not None:
                            return msg
                        if self._closing.is_set():
                            raise TransportClosed(f"{what}: the transport of rank {self.rank} is shut down")
                        # With other threads waiting too, poll briefly so they get their turn.
                        self._pump(min(remaining, 0.05 if self._rx_demand <= 1 else 0.001))
                    finally:
                        self._rx_lock.release()
                msg = mb.try_take(key, what)
                if msg is not None:
                    return msg
        finally:
            self._want_rx(-1)

    def _want_rx(self, delta: int) -> None:
        with self._wake_lock:
            self._rx_demand += delta
            self._last_demand = time.monotonic()
            if delta > 0 and self._io_idle and self._wake_send is not None:
                self._wake_send.send(b"", zmq.NOBLOCK)  # make the I/O thread hand over the socket

    def _pump(self, timeout: float) -> None:
        """Reads and delivers whatever arrives within ``timeout`` s. Caller holds ``_rx_lock``."""
        if not self._router.poll(int(timeout * 1000) if timeout > 0 else 0, zmq.POLLIN):
            return
        for _ in range(4096):
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._handle(frames)

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

    def peer_stats(self) -> dict[int, dict[str, Any]]:
        return {p: {"endpoint": x.endpoint, "state": x.state, "bytes_sent": x.bytes_sent, "bytes_recv": x.bytes_recv,
                    "msgs_sent": x.msgs_sent, "msgs_recv": x.msgs_recv} for p, x in self._peers.items()}

    # ---- I/O thread ---------------------------------------------------------------------------
    def _io_loop(self, ctrl: zmq.Socket, wake: zmq.Socket) -> None:
        # Reads the socket only while no operation thread wants to (they read it themselves), and
        # always watches the peers' connection events.
        busy = zmq.Poller()
        busy.register(ctrl, zmq.POLLIN)
        busy.register(wake, zmq.POLLIN)
        monitors = {}
        for p in self._peers.values():
            if p.monitor is not None:
                busy.register(p.monitor, zmq.POLLIN)
                monitors[p.monitor] = p
        idle = zmq.Poller()
        for sock in (ctrl, wake, *monitors):
            idle.register(sock, zmq.POLLIN)
        idle.register(self._router, zmq.POLLIN)
        grace = 0.005  # the I/O thread reads the socket only after operations left it alone this long (bounds the
        # latency of threads that wait on the mailbox instead of reading, e.g. gossip and PS servers)
        try:
            while True:
                events: dict = {}
                if self._rx_demand == 0 and time.monotonic() - self._last_demand > grace:
                    if self._rx_lock.acquire(timeout=0.05):
                        try:
                            self._io_idle = True
                            if self._rx_demand == 0:
                                events = dict(idle.poll(100 if any(p.suspect_since for p in self._peers.values()) else 1000))
                                if self._router in events:
                                    self._pump(0)
                        finally:
                            self._io_idle = False
                            self._rx_lock.release()
                else:
                    events = dict(busy.poll(int(grace * 1000)))

                if ctrl in events:
                    break
                self._check_suspects()
                if wake in events:
                    while wake.poll(0):
                        wake.recv()
                for sock, p in monitors.items():
                    if sock in events:
                        self._handle_monitor(sock, p)
        except Exception as exc:  # pragma: no cover - defensive: never die silently
            logger.exception("rank %d: I/O thread crashed", self.rank)
            self.mailbox.close(CommError(f"rank {self.rank}: the commlayer I/O thread crashed: {exc!r}"))
        finally:
            ctrl.close(linger=0)
            wake.close(linger=0)

    def _handle(self, frames: list[zmq.Frame]) -> None:
        ident = frames[0].bytes
        try:
            if len(frames) < 2:
                raise WireError("expected an envelope and a header frame, got only the envelope")
            header = unpack_header(frames[1].buffer)
            payload = frames[2:]
            if "shm" in header.meta:
                payload = self._shm_payload(header, payload)
            check_frames(header, payload)
            if not (0 <= header.src < self.world_size) or ident != f"r{header.src}".encode() or header.src == self.rank:
                raise WireError(f"header claims src={header.src} but the connection identifies as {ident!r}")
            if self.curve is not None and self.curve.by_rank is not None:
                uid = user_id(frames[1])
                if uid.encode() != self.curve.by_rank[header.src]:
                    raise WireError(f"message claims src={header.src} but its connection authenticated as another key ({uid[:8]}...)")
        except Exception as exc:  # anything a hostile frame provokes is a rejection, never a crash
            self.rejected += 1
            if self.rejected <= 10 or self.rejected % 1000 == 0:  # rate-limited: a flood must not flood the log
                logger.error("rank %d rejected a message from connection %r (%d so far): %s", self.rank, ident[:32],
                             self.rejected, exc if isinstance(exc, WireError) else f"{type(exc).__name__}: {exc}")
            return
        p = self._peers[header.src]
        p.msgs_recv += 1
        p.bytes_recv += sum(header.nbytes)
        if header.kind == Kind.DATA or header.kind == Kind.HELLO:
            try:
                self.mailbox.deliver(Message(header, payload))
            except WireError as exc:
                self.rejected += 1
                logger.error("rank %d: %s", self.rank, exc)
                self._peer_down(header.src, f"protocol error: {exc}")
        elif header.kind == Kind.BYE:
            p.state = "left"
            why = header.meta.get("reason")
            self.mailbox.peer_failed(header.src, "it shut down its process group (destroy_process_group or exit) before sending"
                                     + (f", after: {why}" if isinstance(why, str) and why else ""))
            for cb in list(self._listeners):
                cb(header.src, "left")
        elif header.kind == Kind.PING:
            try:
                self.send(header.src, Header(Kind.PONG, "pong", header.channel, header.seq, 0, 0, self.rank, meta=header.meta), [])
            except CommError:
                pass
        else:  # PONG: delivered like data for whoever probes
            self.mailbox.deliver(Message(header, payload))

    def _shm_payload(self, header: Header, frames: list[Any]) -> list[Any]:
        starts = header.meta["shm"]
        if frames or not isinstance(starts, list) or len(starts) != len(header.nbytes) or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in starts):
            raise WireError("malformed shared-memory descriptor")
        p = self._peers.get(header.src)
        info = self.peer_info.get(header.src)
        if p is None or info is None or self.endpoint is None or info.host_id != self.endpoint.host_id:
            raise WireError(f"rank {header.src} is not on this machine but sent a shared-memory descriptor")
        if p.shm_in is None:
            try:
                p.shm_in = shm.Consumer(shm.ring_path(info.pid, info.nonce, header.src, self.rank))
            except OSError as exc:
                raise WireError(f"cannot open rank {header.src}'s shared-memory ring: {exc}") from None
        try:
            return p.shm_in.views(starts, list(header.nbytes))
        except ValueError as exc:
            raise WireError(str(exc)) from None

    def _handle_monitor(self, sock: zmq.Socket, p: _Peer) -> None:
        while True:
            try:
                ev = recv_monitor_message(sock, zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return
            event = ev["event"]
            if event == zmq.EVENT_CONNECTED:
                if p.state == "connecting":
                    p.state = "connected"
            elif event == zmq.EVENT_DISCONNECTED:
                # The peer's last data and its goodbye travel on its own connection to us and may
                # still be queued; give them DISCONNECT_GRACE seconds before declaring it dead.
                if p.state == "connected" and not self._closing.is_set() and not p.suspect_since:
                    p.suspect_since = time.monotonic()
            elif event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                why = ("it rejected this rank's key (different COMMLAYER_SECRET or key files?)"
                       if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH else "the security handshake failed (encryption on one side only?)")
                logger.error("rank %d: connection to rank %d at %s refused: %s", self.rank, p.rank, p.endpoint, why)
                p.state = "dead"
                self.mailbox.peer_failed(p.rank, f"connection refused: {why}")

    def _check_suspects(self) -> None:
        now = time.monotonic()
        for p in self._peers.values():
            if p.suspect_since and p.state == "connected" and now - p.suspect_since > DISCONNECT_GRACE:
                self._peer_down(p.rank, f"its connection ({p.endpoint}) dropped without a goodbye: the process died or the network failed")

    def _peer_down(self, peer: int, reason: str) -> None:
        p = self._peers[peer]
        if p.state == "dead":
            return
        p.state = "dead"
        logger.warning("rank %d: rank %d failed: %s", self.rank, peer, reason)
        self.mailbox.peer_failed(peer, reason)
        for cb in list(self._listeners):
            try:
                cb(peer, reason)
            except Exception:  # pragma: no cover - listener bugs must not kill the I/O thread
                logger.exception("failure listener raised")

    # ---- shutdown -----------------------------------------------------------------------------
    def close(self, reason: str = "") -> None:
        """Says goodbye to every peer, flushes (up to ``linger`` s), and frees sockets and threads.

        Args:
            reason: why this rank leaves (e.g. the failure that broke its group); peers still
                waiting for it put it in their error, so the root cause travels to every rank.
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        for p in self._peers.values():
            if p.state in ("connecting", "connected"):
                try:
                    with p.lock:
                        p.sock.send(Header(Kind.BYE, "bye", _HELLO, 0, 0, 0, self.rank,
                                           meta={"reason": reason[:1000]} if reason else {}).pack(), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
        self._closing.set()
        if self._io_thread is not None and self._ctrl_send is not None:
            with self._wake_lock:
                self._ctrl_send.send(b"stop")
            self._io_thread.join(timeout=10)
        self.mailbox.close(TransportClosed(f"rank {self.rank}: the commlayer transport was shut down"))
        got_rx = self._rx_lock.acquire(timeout=2.0)  # let a thread inside _pump() leave the socket
        try:
            linger = int(self.config.linger * 1000)
            for p in self._peers.values():
                with p.lock:
                    p.sock.close(linger=0 if p.state == "dead" else linger)
            for p in self._peers.values():
                if p.monitor is not None:
                    p.monitor.close(linger=0)
            with self._wake_lock:
                for s in (self._ctrl_send, self._wake_send):
                    if s is not None:
                        s.close(linger=0)
                self._wake_send = None
            self._router.close(linger=0)
            if self._auth is not None:
                self._auth.stop()
            self._ctx.term()
        finally:
            if got_rx:
                self._rx_lock.release()
        for p in self._peers.values():
            if p.shm_out is not None:
                p.shm_out.close()
            if p.shm_in is not None:
                p.shm_in.close()
        if self._ipc_file:
            try:
                os.unlink(self._ipc_file)
            except OSError:
                pass

    @property
    def closed(self) -> bool:
        return self._closed


def _with_sizes(header: Header, frames: Sequence[Any]) -> Header:
    return replace(header, nbytes=tuple(f.nbytes if isinstance(f, memoryview) else len(f) if isinstance(f, (bytes, bytearray))
                                        else memoryview(f).nbytes for f in frames))
