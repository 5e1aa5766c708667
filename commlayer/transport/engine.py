"""The ZeroMQ transport: one listening ROUTER per rank, one DEALER per peer, a background I/O thread.

Outgoing messages are written by the calling thread straight into the peer's DEALER (guarded by
a lock); ZeroMQ's own I/O thread does the socket work. Incoming messages are read by the
transport's :class:`~commlayer.transport.receive.Receiver` (a composed object; the waiting thread
or the I/O thread), validated and delivered into the :class:`Mailbox`, where operations pick them
up with timeouts. Peer failure is detected from socket events, a pidfd per co-located peer and
adaptive heartbeats on a separate control connection (:mod:`commlayer.transport.heartbeat`), and
fails every wait that needs the peer. Sends wait while too many bytes are queued towards a peer
(:mod:`commlayer.transport.flow`); ``close()`` lives in :mod:`commlayer.transport.shutdown`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from contextlib import suppress
from dataclasses import replace
from typing import Any, Callable, Sequence

import zmq

from commlayer.transport import envelope, shm
from commlayer.transport.config import TransportConfig
from commlayer.transport.endpoints import EndpointInfo, choose_host, connect_overrides, host_id, ipc_path, peer_address
from commlayer.transport.errors import CollectiveMismatch, CommError, CommTimeout, PeerFailure, TransportClosed
from commlayer.transport.flush import Flush
from commlayer.transport.flow import SendQueue
from commlayer.transport.heartbeat import Heartbeats
from commlayer.transport.hello import handshake
from commlayer.transport.mailbox import Limits, Mailbox, Message, P2PCallback
from commlayer.transport.inbound import ReceiveHooks
from commlayer.transport.receive import Observer, Receiver
from commlayer.transport.shutdown import Shutdown
from commlayer.transport.security import Credentials, CurveKeys, keys_from_env, start_authenticator
from commlayer.transport.sockets import MONITOR_EVENTS, Peer, dealer_socket, router_socket, send_frames
from commlayer.transport.wire import Call, Header, Kind, with_sizes

logger = logging.getLogger(__name__)


class Transport(Heartbeats, Shutdown):
    """Moves byte frames between the ranks of one job.

    Args:
        rank: this process's global rank.
        world_size: number of ranks.
        config: transport knobs.
        name: label used in log and error messages.
    """

    def __init__(self, rank: int, world_size: int, config: TransportConfig | None = None, name: str = "commlayer",
                 curve: CurveKeys | None = None, creds: Credentials | None = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"Expected 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.rank = rank
        self.world_size = world_size
        self.config = config or TransportConfig.from_env()
        self.name = name
        self.nonce = uuid.uuid4().hex[:12]
        c = self.config
        self.mailbox = Mailbox(Limits(c.mailbox_bytes, c.mailbox_messages, c.mailbox_peer_bytes, c.mailbox_message_bytes), rank)
        self.mailbox.add_mismatch_listener(self._warn_mismatch)
        self.first_failure: int | None = None  # the first rank this rank found failed (told to peers in its goodbye)
        self._ctx = zmq.Context(io_threads=1)
        if creds is None:
            keys = curve if curve is not None else keys_from_env(rank, world_size)
            creds = Credentials(keys, None, keys is not None)
        self.creds = creds
        self.curve = creds.curve if creds.encrypt else None  # this rank's server encrypts
        self._auth = start_authenticator(self._ctx, creds)
        self._router = router_socket(self._ctx, self.config, creds)
        self._peers: dict[int, Peer] = {}
        self._listeners: list[Callable[[int, str], None]] = []
        self._closing = threading.Event()
        self._closed = False
        self._close_lock = threading.Lock()
        self._ipc_file = ""
        self._listen_port = 0
        self._shared_hosts: set[str] = set()
        # Passive measurement observers (commlayer.adapt), called as observer(peer, nbytes, seconds):
        # receive: seconds the receiver waited for a message of nbytes; send: seconds spent queueing it.
        self.recv_observers: list[Observer] = []
        self.send_observers: list[Observer] = []
        self.endpoint: EndpointInfo | None = None
        self.peer_info: dict[int, EndpointInfo] = {}
        self._close_hooks: list[Callable[[], None]] = []  # add_close_hook(): run by close()
        hooks = ReceiveHooks(send=self.send, peer_down=self._peer_down, peer_left=self._peer_left, heard=self._heard,
                             on_live=self._on_live, suspect=self._suspect, live_fds=self._live_fds, on_pidfd=self._on_pidfd,
                             tick=self._live_poll)  # the receiver's only way back into the transport
        self._rx = Receiver(rank, world_size, self.config, creds, self.mailbox, self._router, self._peers, self._closing,
                            self.recv_observers, hooks)

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
            logger.warning("rank %d LISTENS ON %s WITHOUT ENCRYPTION: anyone on the path can read the gradients%s",
                           self.rank, tcp, "" if self.creds.authenticated else
                           " and anyone who can reach this port can inject them. Set COMMLAYER_SECRET (same value on every "
                           "rank) or start the ranks through a rendezvous store (torchrun) to authenticate peers")
        pub = self.curve.public.decode() if self.curve is not None else ""
        self.endpoint = EndpointInfo(self.rank, tcp, ipc, host_id(), os.getpid(), self.nonce, pub, bool(connect_overrides()))
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
            ep = peer_address(info, self.endpoint.host_id, overrides.get(p))
            sock = dealer_socket(self._ctx, self.config, self.creds, self.rank, p, info.curve_public)
            monitor = sock.get_monitor_socket(MONITOR_EVENTS)
            sock.connect(ep)
            self._peers[p] = Peer(p, ep, sock, monitor, queue=SendQueue(self.config.send_queue_bytes))
            self._peers[p].shm_ok = ep == info.ipc and bool(self.config.shm_bytes) and shm.available()
            self._live_peer(self._peers[p], info, ep)
        hosts = [x.live.host for x in self._peers.values() if x.live.host]
        self._shared_hosts = {h for h in hosts if hosts.count(h) > 1}
        self._rx.start(self._ctx, self.nonce, self.endpoint.host_id, self.peer_info)

    def handshake(self, timeout: float) -> None:
        """Exchanges HELLO with every peer, proving both directions work before the first op."""
        handshake(self, timeout)

    # ---- data path ------------------------------------------------------------------------
    def recv(self, channel: str, seq: int, step: int, chunk: int, src: int, timeout: float | None = None,
             what: str = "") -> Message:
        """Waits for the message (channel, seq, step, chunk) from ``src`` (see :meth:`Receiver.recv`)."""
        return self._rx.recv(channel, seq, step, chunk, src, timeout, what)

    @property
    def rejected(self) -> int:
        return self._rx.rejected  # messages dropped as malformed, misnamed or unauthenticated

    def send(self, peer: int, header: Header, frames: Sequence[Any], track: bool = False) -> Flush:
        """Sends a header and raw frames to ``peer``; large frames go zero-copy.

        The caller must not modify a zero-copy buffer until the peer has received it (a later
        reply proves that) or, with ``track=True``, until the returned :class:`Flush` is waited.
        """
        if peer == self.rank:
            self.mailbox.deliver(Message(header, [memoryview(f).cast("B") if not isinstance(f, bytes) else f for f in frames]))
            return Flush()
        p = self._peers.get(peer)
        if p is None:
            raise ValueError(f"Expected a peer rank in [0, {self.world_size}), got {peer}")
        self._check_sendable(p, header)
        if frames and not header.nbytes:
            header = with_sizes(header, frames)
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
        big_bytes = sum(nb for nb in header.nbytes if nb >= self.config.copy_threshold) if frames else 0
        if big_bytes:  # flow control: wait while too much is queued towards this peer
            p.queue.admit(big_bytes, t0 + self.config.timeout, lambda: self._check_sendable(p, header),
                          f"{header.op} #{header.seq}: sending to rank {peer}")
        with p.lock:
            try:
                trackers, last = send_frames(p.sock, hdr, frames, self.config.copy_threshold, track)
            except zmq.Again:
                raise CommTimeout(f"{header.op} #{header.seq}: sending to rank {peer} blocked for {self.config.timeout:.0f} s "
                                  f"({self.config.hwm} messages queued); rank {peer} is not receiving") from None
            p.msgs_sent += 1
            p.bytes_sent += sum(header.nbytes)
        if last is not None:
            p.queue.add(last, big_bytes)
        if self.send_observers:
            el = time.monotonic() - t0
            for obs in list(self.send_observers):
                obs(peer, sum(header.nbytes), el)
        return Flush(peer, trackers)

    # ---- facade for topologies and the backend (nobody outside reaches into the mailbox) ------------
    def expect(self, channel: str, seq: int, op: str, call: Call | None, ranks: Sequence[int]) -> None:
        """Declares this rank's collective call ``seq`` on ``channel``; disagreeing messages abort the channel."""
        self.mailbox.expect(channel, seq, op, call, tuple(ranks))

    def post_p2p(self, channel: str, tag: int, src: int | None, callback: P2PCallback) -> None:
        """Posts a receive of a tagged message (``src`` None: any source); ``callback(msg, error)`` runs once."""
        self.mailbox.post_p2p(channel, tag, src, callback)

    def cancel_p2p(self, channel: str, tag: int, callback: P2PCallback) -> bool:
        return self.mailbox.cancel_p2p(channel, tag, callback)

    def abort_channel(self, channel: str, error: BaseException) -> None:
        self.mailbox.abort_channel(channel, error)

    def drop_channel(self, channel: str) -> None:
        self.mailbox.drop_channel(channel)

    def failure_for(self, channel: str, peer: int | None) -> BaseException | None:
        """The error a wait on ``peer`` in ``channel`` would raise now, or None."""
        return self.mailbox.failure_for(channel, peer)

    def wait_flushed(self, flush: Flush, channel: str, timeout: float, what: str) -> None:
        """Waits until ``flush``'s zero-copy buffers are released (fails early if their peer or channel fails)."""
        if flush:
            flush.wait(timeout, lambda peer: self.mailbox.failure_for(channel, peer), what)

    def add_observer(self, on_send: Observer | None = None, on_recv: Observer | None = None) -> None:
        """Adds passive measurement observers ``(peer, nbytes, seconds)``; :meth:`remove_observer` takes them out."""
        self.send_observers += [on_send] if on_send else []
        self.recv_observers += [on_recv] if on_recv else []

    def remove_observer(self, on_send: Observer | None = None, on_recv: Observer | None = None) -> None:
        self.send_observers[:] = [o for o in self.send_observers if o != on_send]  # == : bound methods are new objects
        self.recv_observers[:] = [o for o in self.recv_observers if o != on_recv]

    def _warn_mismatch(self, channel: str, ranks: tuple[int, ...], error: CollectiveMismatch) -> None:
        """Tells every other rank of the group that the channel's calls disagree (they fail it at once)."""
        abort = envelope.control(Kind.ABORT, channel, self.rank, meta={"error": str(error)[:2000], "ranks": list(error.ranks)})
        for r in (r for r in ranks if r in self._peers and self._peers[r].state in ("connecting", "connected")):
            with suppress(CommError):  # that peer is failing anyway
                self.send(r, abort, [])

    def release_ipc_path(self) -> None:
        """Unlinks the ipc:// socket file once every peer is connected (nothing left however the process exits)."""
        if self._ipc_file:
            with suppress(OSError):
                os.unlink(self._ipc_file)
            self._ipc_file = ""

    @property
    def all_local(self) -> bool:
        """True when every peer is on this machine (reached over ipc://, with shared memory)."""
        return all(p.endpoint.startswith("ipc://") for p in self._peers.values())

    def add_failure_listener(self, callback: Callable[[int, str], None]) -> None:
        """``callback(peer, reason)`` runs (on the I/O thread) when a peer fails."""
        self._listeners.append(callback)

    def add_close_hook(self, fn: Callable[[], None]) -> None:
        """``fn()`` runs once in :meth:`close`, after every wait was failed (e.g. unmaps a shared-memory region)."""
        self._close_hooks.append(fn)

    def remove_failure_listener(self, callback: Callable[[int, str], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def _check_sendable(self, p: Peer, header: Header) -> None:
        if self._closing.is_set():
            raise TransportClosed(f"{header.op} #{header.seq}: the transport of rank {self.rank} is shut down")
        if p.state in ("dead", "left"):
            why = self.mailbox.failure_for("", p.rank)  # names the rank to blame (maybe not ``p``)
            raise PeerFailure(f"{header.op} #{header.seq} in {header.channel!r}: cannot send to rank {p.rank}: "
                              + (str(why) if why is not None else "it " + ("shut down" if p.state == "left" else "failed")),
                              peer=getattr(why, "peer", p.rank))

    def peer_stats(self) -> dict[int, dict[str, Any]]:
        """Per peer: endpoint, state, counters, send-queue figures and liveness estimates (:meth:`Peer.stats`)."""
        return {p: x.stats(self.liveness) for p, x in self._peers.items()}

    @property
    def closed(self) -> bool:
        return self._closed

