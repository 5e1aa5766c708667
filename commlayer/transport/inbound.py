"""What arrives from the peers: messages (validated, then delivered or handed to the transport) and connection events.

Used by :class:`commlayer.transport.receive.Receiver` on whichever thread holds the receive turn.
Nothing of a message is kept before its sender's identity, credentials and framing are checked;
anything a hostile frame provokes is a counted, rate-limited rejection, never a crash. What the
transport decides (liveness, failures) goes back through :class:`ReceiveHooks`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import zmq
from zmq.utils.monitor import recv_monitor_message

from commlayer.transport import envelope, shm
from commlayer.transport.endpoints import EndpointInfo
from commlayer.transport.errors import CollectiveMismatch, CommError, WireError
from commlayer.transport.flush import Flush
from commlayer.transport.liveness import LIVE_CHANNEL
from commlayer.transport.mailbox import Mailbox, Message
from commlayer.transport.security import Credentials, user_id
from commlayer.transport.sockets import Peer
from commlayer.transport.wire import PART_BYTES, Header, Kind, check_frames, join_frames, unpack_header

logger = logging.getLogger("commlayer.transport.engine")

DISCONNECT_GRACE = 0.25  # seconds a dropped connection may still deliver the peer's last data and goodbye
LOCAL_GRACE = 0.005  # the same for a co-located peer: its data is already in this machine's socket buffers, and its
# early goodbye (control connection) says whether it left; short, so survivors report before torchrun tears down


@dataclass(frozen=True)
class ReceiveHooks:
    """What the receiver asks of the transport that owns it (called on the I/O thread or a waiting thread).

    Attributes:
        send: sends a header without payload to a peer on its data connection (the answer to a data-path PING).
        peer_down: declares a peer failed, with the reason.
        peer_left: a peer said goodbye: ``(peer, reason, the first failed rank it named)``.
        heard: anything arrived from this peer (refreshes its liveness).
        on_live: a validated heartbeat (PING/PONG on the control connection) from this peer.
        suspect: this peer is dead after ``grace`` s unless its goodbye arrives first.
        live_fds: pidfd -> peer, of the co-located peers (watched by the I/O thread).
        on_pidfd: a co-located peer's process exited.
        tick: due heartbeats and suspects, run once per turn of the I/O thread.
    """

    send: Callable[[int, Header, Sequence[Any]], Flush]
    peer_down: Callable[[int, str], None]
    peer_left: Callable[[Peer, str, Any], None]
    heard: Callable[[Peer], None]
    on_live: Callable[[Peer, Header], None]
    suspect: Callable[[Peer, float, str], None]
    live_fds: Callable[[], dict[int, Peer]]
    on_pidfd: Callable[[Peer], None]
    tick: Callable[[], None]



class Inbound:
    """Validates and dispatches what the peers of one rank send (see the module docstring).

    Args:
        rank, world_size, creds, mailbox: the owning transport's.
        peers: the transport's peer table.
        closing: set by the transport when it shuts down (a dropped connection is then expected).
        hooks: the transport's side.
    """

    def __init__(self, rank: int, world_size: int, creds: Credentials, mailbox: Mailbox, peers: Mapping[int, Peer],
                 closing: threading.Event, hooks: ReceiveHooks) -> None:
        self.rank = rank
        self.world_size = world_size
        self.creds = creds
        self.mailbox = mailbox
        self.rejected = 0  # messages dropped as malformed, misnamed or unauthenticated
        self._peers = peers
        self._closing = closing
        self._hooks = hooks
        self._peer_info: Mapping[int, EndpointInfo] = {}
        self._host_id: str | None = None  # None until connected: no shared-memory descriptor is accepted

    def connected(self, host_id: str, peer_info: Mapping[int, EndpointInfo]) -> None:
        """Every peer's published endpoint is known; ``host_id``: this machine's."""
        self._host_id, self._peer_info = host_id, peer_info

    def parse(self, frames: list[zmq.Frame]) -> tuple[Header, list[Any], bool]:
        """The header, the payload and whether it is a heartbeat (PING/PONG on the liveness channel).

        Raises:
            WireError: the message is malformed, misnamed, unauthenticated or points at memory it may not.
        """
        ident = frames[0].bytes
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
        return header, payload, live

    def _shm_payload(self, header: Header, frames: list[Any]) -> list[Any]:
        starts = header.meta["shm"]
        if frames or not isinstance(starts, list) or len(starts) != len(header.nbytes) or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in starts):
            raise WireError("malformed shared-memory descriptor")
        p = self._peers.get(header.src)
        info = self._peer_info.get(header.src)
        if p is None or info is None or self._host_id is None or info.host_id != self._host_id:
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

    def handle(self, frames: list[zmq.Frame]) -> None:
        """Validates one message from the ROUTER socket and delivers it (data) or hands it to the transport (control)."""
        ident = frames[0].bytes
        try:
            header, payload, live = self.parse(frames)
        except Exception as exc:  # anything a hostile frame provokes is a rejection, never a crash
            self.rejected += 1
            if self.rejected <= 10 or self.rejected % 1000 == 0:  # rate-limited: a flood must not flood the log
                logger.error("rank %d rejected a message from connection %r (%d so far): %s", self.rank, ident[:32],
                             self.rejected, exc if isinstance(exc, WireError) else f"{type(exc).__name__}: {exc}")
            return
        hooks = self._hooks
        p = self._peers[header.src]
        hooks.heard(p)
        if live:
            hooks.on_live(p, header)
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
                hooks.peer_down(header.src, f"protocol error: {exc}")
        elif header.kind == Kind.BYE:
            why = header.meta.get("reason")
            hooks.peer_left(p, why if isinstance(why, str) else "", header.meta.get("failed"))
        elif header.kind == Kind.PING:
            try:
                hooks.send(header.src, envelope.control(Kind.PONG, header.channel, self.rank, seq=header.seq, meta=header.meta), [])
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

    def monitor_events(self, sock: zmq.Socket, p: Peer) -> None:
        """Drains ``p``'s connection events: connected, dropped (suspect it), refused by the security handshake."""
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
                    self._hooks.suspect(p, LOCAL_GRACE if p.live is not None and p.live.local else DISCONNECT_GRACE,
                                        f"its connection ({p.endpoint}) dropped without a goodbye: the process died or the network failed")
            elif event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                why = ("it rejected this rank's key (different COMMLAYER_SECRET or key files?)"
                       if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH else "the security handshake failed (encryption on one side only?)")
                logger.error("rank %d: connection to rank %d at %s refused: %s", self.rank, p.rank, p.endpoint, why)
                p.state = "dead"
                self.mailbox.peer_failed(p.rank, f"connection refused: {why}")
