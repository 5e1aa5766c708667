"""The receiving half of the transport: leader/follower reads of the socket and the I/O thread.

A :class:`Receiver` is owned by :class:`commlayer.transport.engine.Transport`, which hands it the
ROUTER socket, the peer table and the mailbox, and gets liveness and failure decisions back
through :class:`~commlayer.transport.inbound.ReceiveHooks`; what arrives is validated and
dispatched by :class:`~commlayer.transport.inbound.Inbound`. The thread that waits for a message
reads the socket itself when no other thread does; the I/O thread reads only while nobody waits,
and always watches the peers' connection events.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

import zmq

from commlayer.transport.config import TransportConfig
from commlayer.transport.endpoints import EndpointInfo
from commlayer.transport.errors import CommError, TransportClosed
from commlayer.transport.inbound import Inbound, ReceiveHooks
from commlayer.transport.mailbox import Mailbox, Message, timeout_error
from commlayer.transport.security import Credentials
from commlayer.transport.sockets import Peer

logger = logging.getLogger("commlayer.transport.engine")

Observer = Callable[[int, int, float], None]


class Receiver:
    """Receives for one transport (see the module docstring).

    Args:
        rank, world_size, config, creds, mailbox: the owning transport's.
        router: the listening socket; read by whichever thread holds the receive turn.
        peers: the transport's peer table (filled by ``connect`` before :meth:`start`).
        closing: set by the transport when it shuts down.
        observers: ``observer(peer, nbytes, seconds waited)`` for every message taken by :meth:`recv`.
        hooks: the transport's side (liveness and failures).
    """

    def __init__(self, rank: int, world_size: int, config: TransportConfig, creds: Credentials, mailbox: Mailbox,
                 router: zmq.Socket, peers: Mapping[int, Peer], closing: threading.Event, observers: list[Observer],
                 hooks: ReceiveHooks) -> None:
        self.rank = rank
        self.config = config
        self.mailbox = mailbox
        self.stalled: tuple[float, float] = (0.0, 0.0)  # (when, seconds) of this process's last stall
        self._router = router
        self._peers = peers
        self._closing = closing
        self._observers = observers
        self._hooks = hooks
        self._inbound = Inbound(rank, world_size, creds, mailbox, peers, closing, hooks)
        self._thread: threading.Thread | None = None
        self._ctrl_send: zmq.Socket | None = None
        self._wake_send: zmq.Socket | None = None
        self._wake_lock = threading.Lock()
        self._rx_lock = threading.Lock()
        self._rx_demand = 0
        self._last_demand = 0.0
        self._io_idle = False

    @property
    def rejected(self) -> int:
        """Messages dropped as malformed, misnamed or unauthenticated."""
        return self._inbound.rejected

    # ---- lifecycle (called by the transport) ---------------------------------------------------
    def start(self, ctx: zmq.Context, nonce: str, host_id: str, peer_info: Mapping[int, EndpointInfo]) -> None:
        """Starts the I/O thread once every peer is in the table; ``host_id``: this machine's."""
        self._inbound.connected(host_id, peer_info)
        ctrl_recv, self._ctrl_send = _pair(ctx, f"ctrl-{nonce}")
        wake_recv, self._wake_send = _pair(ctx, f"wake-{nonce}")
        self._thread = threading.Thread(target=self._io_loop, args=(ctrl_recv, wake_recv), name=f"commlayer-io-{self.rank}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Ends the I/O thread (waits up to ``timeout`` s)."""
        if self._thread is not None and self._ctrl_send is not None:
            with self._wake_lock:
                self._ctrl_send.send(b"stop")
            self._thread.join(timeout=timeout)

    @contextmanager
    def socket_released(self, timeout: float) -> Iterator[bool]:
        """Holds the receive turn (up to ``timeout`` s to get it) so no thread is inside the socket; yields whether it got it."""
        got = self._rx_lock.acquire(timeout=timeout)
        try:
            yield got
        finally:
            if got:
                self._rx_lock.release()

    def close_pipes(self) -> None:
        """Closes the inproc sockets that stop and wake the I/O thread (after :meth:`stop`)."""
        with self._wake_lock:
            for s in (self._ctrl_send, self._wake_send):
                if s is not None:
                    s.close(linger=0)
            self._wake_send = None

    # ---- waiting for a message -------------------------------------------------------------------
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
            waited = time.monotonic() - t0
        else:
            waited = 0.0
        for obs in list(self._observers):
            obs(src, msg.nbytes, waited)
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
                        # Short slices: a peer failure declared by the I/O thread is seen within 10 ms;
                        # with other threads waiting too, poll briefly so they get their turn.
                        self._pump(min(remaining, 0.01 if self._rx_demand <= 1 else 0.001))
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
            self._inbound.handle(frames)

    # ---- the I/O thread --------------------------------------------------------------------------
    def _io_loop(self, ctrl: zmq.Socket, wake: zmq.Socket) -> None:
        # Reads the socket only while no operation thread wants to (they read it themselves), and
        # always watches the peers' connection events.
        hooks = self._hooks
        busy = zmq.Poller()
        busy.register(ctrl, zmq.POLLIN)
        busy.register(wake, zmq.POLLIN)
        monitors = {}
        for p in self._peers.values():
            if p.monitor is not None:
                busy.register(p.monitor, zmq.POLLIN)
                monitors[p.monitor] = p
        pidfds = hooks.live_fds()
        for fd in pidfds:
            busy.register(fd, zmq.POLLIN)
        idle = zmq.Poller()
        for sock in (ctrl, wake, *monitors, *pidfds):
            idle.register(sock, zmq.POLLIN)
        idle.register(self._router, zmq.POLLIN)
        grace = 0.005  # the I/O thread reads the socket only after operations left it alone this long (bounds the
        # latency of threads that wait on the mailbox instead of reading, e.g. gossip and PS servers)
        last = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                if now - last > max(2 * self.config.heartbeat, 2.0):  # this process did not run: peers may drop it
                    self.stalled = (now, now - last)
                    logger.warning("rank %d: this process was stalled for %.1f s (stopped, swapped out or starved)", self.rank,
                                   now - last)
                last = now
                events: dict = {}
                if self._rx_demand == 0 and time.monotonic() - self._last_demand > grace:
                    if self._rx_lock.acquire(timeout=0.05):
                        try:
                            self._io_idle = True
                            if self._rx_demand == 0:
                                events = dict(idle.poll(self._idle_poll_ms()))
                                if self._router in events:
                                    self._pump(0)
                        finally:
                            self._io_idle = False
                            self._rx_lock.release()
                else:
                    events = dict(busy.poll(int(grace * 1000)))

                if ctrl in events:
                    break
                for fd, p in pidfds.items():
                    if fd in events:
                        hooks.on_pidfd(p)
                        busy.unregister(fd)
                        idle.unregister(fd)
                pidfds = {fd: p for fd, p in pidfds.items() if fd not in events}
                hooks.tick()
                if wake in events:
                    while wake.poll(0):
                        wake.recv()
                for sock, p in monitors.items():
                    if sock in events:
                        self._inbound.monitor_events(sock, p)
        except Exception as exc:  # pragma: no cover - defensive: never die silently
            logger.exception("rank %d: I/O thread crashed", self.rank)
            self.mailbox.close(CommError(f"rank {self.rank}: the commlayer I/O thread crashed: {exc!r}"))
        finally:
            ctrl.close(linger=0)
            wake.close(linger=0)

    def _idle_poll_ms(self) -> int:
        """Until the nearest suspect's deadline (a dead local peer is failed ~5 ms after its exit), else 100 ms."""
        due = [p.suspect_since for p in self._peers.values() if p.suspect_since]
        if not due:
            return 100
        return max(1, min(100, int((min(due) - time.monotonic()) * 1000) + 1))


def _pair(ctx: zmq.Context, name: str) -> tuple[zmq.Socket, zmq.Socket]:
    """Two connected inproc PAIR sockets (the I/O thread's end first)."""
    a = ctx.socket(zmq.PAIR)
    a.bind(f"inproc://{name}")
    b = ctx.socket(zmq.PAIR)
    b.connect(f"inproc://{name}")
    return a, b
