"""Heartbeats on a separate control connection per peer, and the liveness checks of the I/O thread.

Mixed into :class:`commlayer.transport.engine.Transport`. Each rank keeps a second DEALER per peer
(routing id ``c<rank>``) to the peer's ROUTER, so a heartbeat never waits behind megabytes of
payload in ZeroMQ's queue or the kernel's send buffer (it still shares the link's bottleneck queue,
which is what its round trip measures). The I/O thread sends a PING to every peer each
``heartbeat`` seconds; the peer answers with a PONG on its own control connection, giving a
round-trip sample. Any message from a peer refreshes its ``last_heard``; a silent one is judged
by :func:`commlayer.transport.liveness.verdict`. Co-located peers are also watched through a
pidfd, so their death is seen within milliseconds.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import zmq

from commlayer.transport.endpoints import EndpointInfo
from commlayer.transport.receive import LOCAL_GRACE
from commlayer.transport.liveness import LIVE_CHANNEL, LivenessConfig, PeerLive, open_pidfd, verdict
from commlayer.transport.security import secure_client
from commlayer.transport.tcpinfo import TcpView
from commlayer.transport.wire import Header, Kind

logger = logging.getLogger("commlayer.transport.engine")

EXAM_EVERY = 0.2  # seconds between kernel examinations of a peer that stays silent


def _host_port(endpoint: str) -> tuple[str, int]:
    if not endpoint.startswith("tcp://"):
        return "", 0
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else 0


class Heartbeats:
    """Liveness methods of the transport (see the module docstring)."""

    def _live_peer(self, p: Any, info: EndpointInfo, ep: str, server_key: bytes | None) -> None:
        """Opens the control connection and the pidfd of peer ``p`` (called by ``connect``)."""
        ctrl = self._ctx.socket(zmq.DEALER)
        ctrl.setsockopt(zmq.ROUTING_ID, f"c{self.rank}".encode())
        ctrl.setsockopt(zmq.SNDHWM, 64)  # heartbeats are disposable: never queue many
        ctrl.setsockopt(zmq.LINGER, 0)
        ctrl.setsockopt(zmq.RECONNECT_IVL, 100)
        ctrl.setsockopt(zmq.HEARTBEAT_IVL, 0)
        if self.curve is not None:
            secure_client(ctrl, self.curve, server_key)
        ctrl.connect(ep)
        p.ctrl = ctrl
        p.ctrl_lock = threading.Lock()
        local = self.endpoint is not None and info.host_id == self.endpoint.host_id
        host, port = _host_port(ep)
        now = time.monotonic()
        p.live = PeerLive(local, info.pid, host, port, now, open_pidfd(info.pid) if local else None)
        p.live.next_ping = now

    @property
    def liveness(self) -> LivenessConfig:
        return self.config.liveness

    def live_timeout(self, peer: int) -> float:
        """The current adaptive silence timeout of ``peer`` in seconds."""
        return self._peers[peer].live.timeout(self.liveness)

    def _heard(self, p: Any) -> None:
        p.live.last_heard = time.monotonic()
        if p.live.stall_logged:
            p.live.stall_logged = False
            logger.info("rank %d: rank %d is heard from again", self.rank, p.rank)

    def _send_live(self, p: Any, header: Header) -> None:
        with p.ctrl_lock:
            if p.ctrl is None:
                return
            try:
                p.ctrl.send(header.pack(), zmq.NOBLOCK)
            except zmq.ZMQError:  # full or closing: a heartbeat is never worth waiting for
                pass

    def _on_live(self, p: Any, header: Header) -> None:
        """A heartbeat from ``p`` (already validated): answer a PING, learn from a PONG."""
        if header.kind == Kind.PING:
            self._send_live(p, Header(Kind.PONG, "pong", LIVE_CHANNEL, header.seq, 0, 0, self.rank, meta=header.meta))
        elif header.kind == Kind.PONG:
            t = header.meta.get("t")
            if isinstance(t, float):
                p.live.rtt.add(time.monotonic() - t)

    def _live_fds(self) -> dict[int, Any]:
        """pidfd -> peer, for the I/O thread's pollers."""
        return {p.live.pidfd: p for p in self._peers.values() if p.live is not None and p.live.pidfd is not None}

    def _on_pidfd(self, p: Any) -> None:
        """A co-located peer's process exited: give its last messages ``LOCAL_GRACE``, then fail it."""
        if p.state == "connected" or p.state == "connecting":
            self._suspect(p, LOCAL_GRACE, f"its process (pid {p.live.pid}) exited")

    def _live_tick(self) -> None:
        """Sends due heartbeats and examines silent peers (I/O thread, every loop)."""
        now = time.monotonic()
        cfg = self.liveness
        view: TcpView | None = None
        for p in self._peers.values():
            lv = p.live
            if lv is None or p.state not in ("connecting", "connected"):
                continue
            if now >= lv.next_ping:
                lv.ping_seq += 1
                lv.next_ping = now + cfg.heartbeat
                self._send_live(p, Header(Kind.PING, "ping", LIVE_CHANNEL, lv.ping_seq, 0, 0, self.rank, meta={"t": now}))
            silence = now - lv.last_heard
            if p.state != "connected" or p.msgs_recv == 0 or p.suspect_since or silence <= lv.timeout(cfg) or now < lv.next_exam:
                continue
            lv.next_exam = now + EXAM_EVERY
            if p.leaving:  # said goodbye and fell silent: gone once nothing more can arrive
                if not self._still_delivering(p, now):
                    self._peer_left(p, p.leave_why)
                continue
            if view is None and not lv.local:
                view = TcpView(self._listen_port, self._shared_hosts)
            if view is not None and not lv.local:
                lv.kernel_rtt = view.rtt(lv.host, lv.port) or lv.kernel_rtt
            timeout = lv.timeout(cfg)
            if silence <= timeout:
                continue
            why = verdict(lv, silence, timeout, view)
            if why is not None:
                self._peer_down(p.rank, why)
            elif not lv.stall_logged:
                lv.stall_logged = True
                logger.info("rank %d: rank %d sent nothing for %.1f s (adaptive timeout %.1f s) but is alive (%s); waiting",
                               self.rank, p.rank, silence, timeout,
                               "its process is running" if lv.local else "its host still acknowledges")

    def _still_delivering(self, p: Any, now: float) -> bool:
        """A peer that said goodbye on its control connection still has a TCP connection to this rank open
        (its last data may be queued behind a slow link); bounded by the ceiling of the adaptive timeout."""
        if p.live is None or p.live.local or now - p.leaving > self.liveness.ceiling:
            return False
        return bool(TcpView(self._listen_port, self._shared_hosts).connections(p.live.host, p.live.port))

    def _say_goodbye_early(self, reason: str) -> None:
        """BYE on every control connection: it does not wait behind queued data, so peers know this rank is
        leaving (not failing) when its connections close before its data connection's own BYE arrives."""
        for p in self._peers.values():
            if p.state in ("connecting", "connected"):
                self._send_live(p, Header(Kind.BYE, "bye", LIVE_CHANNEL, 0, 0, 0, self.rank,
                                          meta={"reason": reason[:1000]} if reason else {}))

    def _live_close(self) -> None:
        """Closes control sockets and pidfds (after the I/O thread stopped)."""
        for p in self._peers.values():
            with p.ctrl_lock:
                if p.ctrl is not None:  # linger: the early goodbye must leave
                    p.ctrl.close(linger=0 if p.state == "dead" else int(self.config.linger * 1000))
                    p.ctrl = None
            if p.live is not None and p.live.pidfd is not None:
                try:
                    os.close(p.live.pidfd)
                except OSError:
                    pass
                p.live.pidfd = None
