"""The receiving half of the transport: leader/follower reads, the I/O thread, validation, failure detection.

Mixed into :class:`commlayer.transport.engine.Transport`, whose attributes it uses (the ROUTER socket,
the peers, the mailbox, the locks). The thread that waits for a message reads the socket itself
when no other thread does; the I/O thread reads only while nobody waits, and always watches the
peers' connection events.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from commlayer.transport import envelope, shm
from commlayer.transport.errors import CollectiveMismatch, CommError, TransportClosed, WireError
from commlayer.transport.liveness import LIVE_CHANNEL
from commlayer.transport.mailbox import Message, timeout_error
from commlayer.transport.security import user_id
from commlayer.transport.wire import PART_BYTES, Header, Kind, check_frames, join_frames, unpack_header

logger = logging.getLogger("commlayer.transport.engine")

DISCONNECT_GRACE = 0.25  # seconds a dropped connection may still deliver the peer's last data and goodbye
LOCAL_GRACE = 0.005  # the same for a co-located peer: its data is already in this machine's socket buffers, and its
# early goodbye (control connection) says whether it left; short, so survivors report before torchrun tears down


class Receiver:
    """Receive-side methods of the transport (see the module docstring)."""

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
        for obs in list(self.recv_observers):
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
            self._handle(frames)

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
        pidfds = self._live_fds()
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
                        self._on_pidfd(p)
                        busy.unregister(fd)
                        idle.unregister(fd)
                pidfds = {fd: p for fd, p in pidfds.items() if fd not in events}
                self._check_suspects()
                self._live_tick()
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

    def _idle_poll_ms(self) -> int:
        """Until the nearest suspect's deadline (a dead local peer is failed ~5 ms after its exit), else 100 ms."""
        due = [p.suspect_since for p in self._peers.values() if p.suspect_since]
        if not due:
            return 100
        return max(1, min(100, int((min(due) - time.monotonic()) * 1000) + 1))

    def _handle(self, frames: list[zmq.Frame]) -> None:
        ident = frames[0].bytes
        try:
            if len(frames) < 2:
                raise WireError("expected an envelope and a header frame, got only the envelope")
            header = unpack_header(frames[1].buffer)
            # Identity first: nothing of an unauthenticated or misnamed sender is joined, mapped or buffered.
            live = header.channel == LIVE_CHANNEL and header.kind in (Kind.PING, Kind.PONG)
            ctrl_ok = live or header.kind == Kind.BYE  # the control connection carries heartbeats and an early goodbye
            idents = (f"r{header.src}".encode(), f"c{header.src}".encode()) if ctrl_ok else (f"r{header.src}".encode(),)
            if not (0 <= header.src < self.world_size) or header.src == self.rank or ident not in idents:
                raise WireError(f"header claims src={header.src} but the connection identifies as {ident!r}")
            if not self.creds.accepts(header.src, user_id(frames[1])):
                raise WireError(f"message claims src={header.src} but its connection authenticated as another peer "
                                f"({user_id(frames[1])[:8]}...)")
            payload = [f.buffer for f in frames[2:]]
            if "shm" in header.meta:
                payload = self._shm_payload(header, payload)
            else:
                payload = join_frames(header, payload, PART_BYTES)
            check_frames(header, payload)
        except Exception as exc:  # anything a hostile frame provokes is a rejection, never a crash
            self.rejected += 1
            if self.rejected <= 10 or self.rejected % 1000 == 0:  # rate-limited: a flood must not flood the log
                logger.error("rank %d rejected a message from connection %r (%d so far): %s", self.rank, ident[:32],
                             self.rejected, exc if isinstance(exc, WireError) else f"{type(exc).__name__}: {exc}")
            return
        p = self._peers[header.src]
        self._heard(p)
        if live:
            self._on_live(p, header)
            return
        if ident[:1] == b"c":  # BYE ahead of the data still queued on its data connection: it is leaving
            why = header.meta.get("reason")
            p.leaving, p.leave_why, p.leave_failed = time.monotonic(), why if isinstance(why, str) else "", header.meta.get("failed")
            sent = header.meta.get("sent")
            p.leave_sent = sent if isinstance(sent, int) and not isinstance(sent, bool) else -1
            return
        p.msgs_recv += 1
        p.bytes_recv += sum(header.nbytes)
        if header.kind in (Kind.DATA, Kind.HELLO, Kind.P2P):
            try:
                self.mailbox.deliver(Message(header, payload))
            except WireError as exc:
                self.rejected += 1
                logger.error("rank %d: %s", self.rank, exc)
                self._peer_down(header.src, f"protocol error: {exc}")
        elif header.kind == Kind.BYE:
            why = header.meta.get("reason")
            self._peer_left(p, why if isinstance(why, str) else "", header.meta.get("failed"))
        elif header.kind == Kind.PING:
            try:
                self.send(header.src, envelope.control(Kind.PONG, header.channel, self.rank, seq=header.seq, meta=header.meta), [])
            except CommError:
                pass
        elif header.kind == Kind.ABORT:  # a peer found this channel's calls mismatched: fail it here too
            why = header.meta.get("error")
            ranks = header.meta.get("ranks")
            self.mailbox.abort_channel(header.channel, CollectiveMismatch(
                f"{why if isinstance(why, str) else 'collective mismatch'} (found by rank {header.src})",
                ranks=tuple(r for r in ranks if isinstance(r, int)) if isinstance(ranks, list) else ()))
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

    def _handle_monitor(self, sock: zmq.Socket, p: Any) -> None:
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
                if p.state == "connected" and not self._closing.is_set():
                    self._suspect(p, LOCAL_GRACE if p.live is not None and p.live.local else DISCONNECT_GRACE,
                                  f"its connection ({p.endpoint}) dropped without a goodbye: the process died or the network failed")
            elif event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                why = ("it rejected this rank's key (different COMMLAYER_SECRET or key files?)"
                       if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH else "the security handshake failed (encryption on one side only?)")
                logger.error("rank %d: connection to rank %d at %s refused: %s", self.rank, p.rank, p.endpoint, why)
                p.state = "dead"
                self.mailbox.peer_failed(p.rank, f"connection refused: {why}")

    def _peer_down(self, peer: int, reason: str) -> None:
        p = self._peers[peer]
        if p.state == "dead":
            return
        p.state = "dead"
        culprit = peer
        at, gap = self.stalled
        if gap and time.monotonic() - at < 4 * self.config.heartbeat + 2.0:  # blame the stall, not the peer
            culprit = self.rank
            reason = (f"this rank (rank {self.rank}) was stalled for {gap:.1f} s (stopped, swapped out or starved), so its link "
                      f"to rank {peer} timed out; rank {peer} is probably alive ({reason})")
        if self.first_failure is None:
            self.first_failure = culprit
        logger.warning("rank %d: rank %d failed: %s", self.rank, peer, reason)
        self.mailbox.peer_failed(peer, reason, culprit)
        for cb in list(self._listeners):
            try:
                cb(peer, reason)
            except Exception:  # pragma: no cover - listener bugs must not kill the I/O thread
                logger.exception("failure listener raised")

    # ---- shutdown -----------------------------------------------------------------------------
