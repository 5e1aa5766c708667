"""Bounded mailboxes: messages that arrive before anyone asks for them wait here.

Collective messages are matched on an exact key (channel, seq, step, chunk, src) and checked
against the fingerprint of this rank's own call (:meth:`Mailbox.expect`): any disagreement aborts
the channel at once and tells the transport, which warns the other ranks. Point-to-point messages
(``Kind.P2P``) are matched in order per (channel, tag), MPI style, so ``irecv`` posted before the
message arrives and ``recv`` from any source both work. What may wait is bounded in total, per
sending peer and per message.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable

from commlayer.transport.errors import CollectiveMismatch, CommTimeout, PeerFailure, TransportClosed, WireError
from commlayer.transport.wire import Call, Header, Kind

Key = tuple[str, int, int, int, int]  # channel, seq, step, chunk, src
RECENT_CALLS = 256  # fingerprints kept per channel, so late messages of finished calls are checked too
MismatchListener = Callable[[str, tuple[int, ...], CollectiveMismatch], None]
P2PCallback = Callable[["Message | None", "BaseException | None"], None]


@dataclass(slots=True)
class Message:
    """A received message: its validated header and payload frames (buffer-protocol objects)."""

    header: Header
    frames: list[Any]

    @property
    def nbytes(self) -> int:
        return sum(self.header.nbytes)


@dataclass(frozen=True, slots=True)
class _Expected:
    op: str
    call: Call | None
    ranks: tuple[int, ...]  # global rank of each group rank


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what may wait for a call not posted yet.

    Attributes:
        total_bytes: payload bytes over all peers.
        messages: number of messages over all peers.
        peer_bytes: payload bytes from one peer.
        message_bytes: payload bytes of one message.
    """

    total_bytes: int = 4 << 30
    messages: int = 1 << 20
    peer_bytes: int = 2 << 30
    message_bytes: int = 2 << 30


class Mailbox:
    """Thread-safe store of early messages; failures and aborts reach every waiter.

    Args:
        limits: bounds on buffered messages.
        rank: this process's global rank (for error messages).
    """

    def __init__(self, limits: Limits, rank: int = -1) -> None:
        self._lock = threading.Lock()
        self._box: dict[Key, Message] = {}
        self._p2p: dict[tuple[str, int], deque[Message]] = {}
        self._posted: dict[tuple[str, int], deque[tuple[int | None, P2PCallback]]] = {}
        self._calls: dict[str, OrderedDict[int, _Expected]] = {}
        self._dead: dict[int, tuple[str, int]] = {}  # peer -> (why, the rank to blame)
        self._aborted: dict[str, BaseException] = {}
        self._closed: BaseException | None = None
        self._bytes = 0
        self._peer_bytes: dict[int, int] = {}
        self.limits = limits
        self.rank = rank
        self._mismatch_listeners: list[MismatchListener] = []

    def add_mismatch_listener(self, callback: MismatchListener) -> None:
        """``callback(channel, ranks, error)`` runs once per channel whose calls disagree (found here)."""
        self._mismatch_listeners.append(callback)

    # ---- delivery (I/O thread) -------------------------------------------------------------
    def deliver(self, msg: Message) -> None:
        h = msg.header
        if h.kind == Kind.P2P:
            self._deliver_p2p(msg)
            return
        key = (h.channel, h.seq, h.step, h.chunk, h.src)
        with self._lock:
            if h.channel in self._aborted or self._closed is not None:
                return
            exp = self._calls.get(h.channel, {}).get(h.seq)
            mismatch = self._mismatch(exp, h) if exp is not None else None
            if mismatch is None:
                if key in self._box:
                    raise WireError(f"duplicate message from rank {h.src} for {h.op} #{h.seq} step {h.step} chunk {h.chunk} in channel {h.channel!r}")
                self._check_bounds(msg)
                self._store(key, msg)
                return
        self._mismatched(h.channel, exp, mismatch)

    def _store(self, key: Key, msg: Message) -> None:
        self._box[key] = msg
        self._bytes += msg.nbytes
        self._peer_bytes[msg.header.src] = self._peer_bytes.get(msg.header.src, 0) + msg.nbytes

    def _unstore(self, msg: Message) -> None:
        self._bytes -= msg.nbytes
        self._peer_bytes[msg.header.src] -= msg.nbytes

    def _check_bounds(self, msg: Message) -> None:
        h, lim, n = msg.header, self.limits, msg.nbytes
        held = self._peer_bytes.get(h.src, 0)
        what = f"rank {h.src} sent {h.op} #{h.seq} ({n} bytes) ahead of this rank"
        if n > lim.message_bytes:
            raise WireError(f"{what}: more than the {lim.message_bytes} bytes one message may hold before its call is posted "
                            "(raise COMMLAYER_MAILBOX_MESSAGE_BYTES, or make ranks issue the same operations)")
        if held + n > lim.peer_bytes:
            raise WireError(f"{what} while {held} bytes from it already wait (limit {lim.peer_bytes} bytes per peer; raise "
                            "COMMLAYER_MAILBOX_PEER_BYTES or make ranks issue the same operations)")
        if len(self._box) + 1 > lim.messages or self._bytes + n > lim.total_bytes:
            raise WireError(
                f"mailbox full: {what} while {len(self._box)} messages / {self._bytes} bytes already wait (limits {lim.messages} "
                f"messages, {lim.total_bytes} bytes; raise COMMLAYER_MAILBOX_BYTES or make ranks issue the same operations)")

    def _deliver_p2p(self, msg: Message) -> None:
        h = msg.header
        qkey = (h.channel, h.tag)
        with self._lock:
            if h.channel in self._aborted or self._closed is not None:
                return
            posted = self._posted.get(qkey, deque())
            match = next((p for p in posted if p[0] is None or p[0] == h.src), None)
            if match is None:
                self._check_bounds(msg)
                self._p2p.setdefault(qkey, deque()).append(msg)
                self._bytes += msg.nbytes
                self._peer_bytes[h.src] = self._peer_bytes.get(h.src, 0) + msg.nbytes
                return
            posted.remove(match)
        match[1](msg, None)

    # ---- collective fingerprints ---------------------------------------------------------
    def expect(self, channel: str, seq: int, op: str, call: Call | None, ranks: tuple[int, ...]) -> None:
        """Records this rank's call #``seq`` on ``channel``; messages of that call that disagree abort the channel.

        Raises:
            CollectiveMismatch: a message of this call that already arrived disagrees.
        """
        exp = _Expected(op, call, ranks)
        found = None
        with self._lock:
            calls = self._calls.setdefault(channel, OrderedDict())
            calls[seq] = exp
            while len(calls) > RECENT_CALLS:
                calls.popitem(last=False)
            if self._box:
                for key, m in self._box.items():
                    if key[0] == channel and key[1] == seq:
                        found = self._mismatch(exp, m.header)
                        if found is not None:
                            break
        if found is not None:
            self._mismatched(channel, exp, found)
            raise found

    def _mismatch(self, exp: _Expected, h: Header) -> CollectiveMismatch | None:
        if h.op == exp.op and (h.call is None) == (exp.call is None) and (exp.call is None or not exp.call.differs(h.call)):
            return None
        def name(g: int) -> str:
            gr = exp.ranks.index(g) if g in exp.ranks else -1
            return f"rank {gr}" if gr == g else f"rank {gr} (global rank {g})"
        mine = exp.call.describe(exp.op) if exp.call is not None else exp.op
        theirs = h.call.describe(h.op) if h.call is not None else h.op
        return CollectiveMismatch(
            f"collective mismatch in group {h.channel!r}, call #{h.seq}: {name(self.rank)} called {mine} but {name(h.src)} "
            f"called {theirs}; every rank must call the same collectives, with the same root, size, dtype and reduce op, "
            "in the same order", ranks=(self.rank, h.src))

    def _mismatched(self, channel: str, exp: _Expected, error: CollectiveMismatch) -> None:
        first = self.abort_channel(channel, error)
        if first:
            for cb in list(self._mismatch_listeners):
                cb(channel, exp.ranks, error)

    # ---- retrieval (operation threads) ---------------------------------------------------
    def try_take(self, key: Key, what: str) -> Message | None:
        """Returns the message with ``key`` if it is here, None if not yet; raises if it never will be."""
        with self._lock:
            msg = self._box.pop(key, None)
            if msg is not None:
                self._unstore(msg)
                return msg
            err = self._failure_for(key[0], key[4])
            aborted = key[0] in self._aborted
        if err is not None:
            if isinstance(err, PeerFailure) and not aborted:
                raise PeerFailure(f"{what}: {err}", peer=err.peer)
            raise err
        return None

    def post_p2p(self, channel: str, tag: int, src: int | None, callback: P2PCallback) -> None:
        """Posts a point-to-point receive; ``callback(msg, error)`` runs exactly once."""
        qkey = (channel, tag)
        with self._lock:
            err = self._failure_for(channel, src)
            msg = None
            if err is None:
                arrived = self._p2p.get(qkey)
                if arrived:
                    for i, m in enumerate(arrived):
                        if src is None or m.header.src == src:
                            msg = m
                            del arrived[i]
                            self._unstore(m)
                            break
                if msg is None:
                    self._posted.setdefault(qkey, deque()).append((src, callback))
                    return
        callback(msg, err)

    def cancel_p2p(self, channel: str, tag: int, callback: P2PCallback) -> bool:
        """Withdraws a posted receive; False if it was already matched (or failed)."""
        with self._lock:
            posted = self._posted.get((channel, tag))
            for p in posted or ():
                if p[1] is callback:
                    posted.remove(p)
                    return True
        return False

    # ---- failures --------------------------------------------------------------------------
    def _failure_for(self, channel: str, src: int | None) -> BaseException | None:
        if self._closed is not None:
            return self._closed
        if channel in self._aborted:
            return self._aborted[channel]
        if src is not None and src in self._dead:
            return self._blame(src)
        return None

    def _blame(self, src: int) -> PeerFailure:
        """The failure of a wait on ``src``, naming the rank that actually failed."""
        why, culprit = self._dead[src]
        if culprit == src:
            return PeerFailure(f"rank {src} is gone: {why}", peer=src)
        if culprit == self.rank:
            return PeerFailure(f"this rank (rank {self.rank}) stalled and was dropped by rank {src}: {why}", peer=culprit)
        return PeerFailure(f"rank {culprit} failed: rank {src}, which this wait needed, {why}", peer=culprit)

    def failure_for(self, channel: str, src: int | None) -> BaseException | None:
        """The error a wait on ``src`` in ``channel`` would raise now, or None."""
        with self._lock:
            return self._failure_for(channel, src)

    def peer_failed(self, peer: int, reason: str, culprit: int | None = None) -> None:
        """Fails every posted receive on ``peer``; later waits on it fail at once.

        Args:
            culprit: the rank to blame when it is not ``peer`` (``peer`` left because ``culprit`` failed;
                this rank's own number when ``peer`` dropped this rank for being silent).
        """
        callbacks = []
        with self._lock:
            self._dead.setdefault(peer, (reason, peer if culprit is None else culprit))
            err = self._blame(peer)
            for posted in self._posted.values():
                for p in [p for p in posted if p[0] == peer]:
                    posted.remove(p)
                    callbacks.append(p[1])
        for cb in callbacks:
            cb(None, err)

    def peer_is_dead(self, peer: int) -> bool:
        with self._lock:
            return peer in self._dead

    def abort_channel(self, channel: str, error: BaseException) -> bool:
        """Fails every pending and later wait on ``channel`` with ``error``; True if it was not aborted yet."""
        return self._fail(lambda key_channel: key_channel == channel, error, channel)

    def close(self, error: BaseException | None = None) -> None:
        self._fail(lambda _c: True, error or TransportClosed("transport closed"), None)

    def _fail(self, match: Callable[[str], bool], error: BaseException, channel: str | None) -> bool:
        callbacks = []
        with self._lock:
            if channel is None:
                first = self._closed is None
                self._closed = error
            else:
                first = channel not in self._aborted
                self._aborted.setdefault(channel, error)
            for (ch, _tag), posted in self._posted.items():
                if match(ch):
                    callbacks.extend(p[1] for p in posted)
                    posted.clear()
            for key in [k for k in self._box if match(k[0])]:
                self._unstore(self._box.pop(key))
            for qkey in [k for k in self._p2p if match(k[0])]:
                for m in self._p2p.pop(qkey):
                    self._unstore(m)
        for cb in callbacks:
            cb(None, error)
        return first

    def drop_channel(self, channel: str) -> None:
        """Forgets buffered messages and fingerprints of a finished channel (no error for anyone)."""
        with self._lock:
            for key in [k for k in self._box if k[0] == channel]:
                self._unstore(self._box.pop(key))
            self._calls.pop(channel, None)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"messages": len(self._box) + sum(len(q) for q in self._p2p.values()), "bytes": self._bytes,
                    "peers_holding": sum(1 for v in self._peer_bytes.values() if v),
                    "waiters": sum(len(q) for q in self._posted.values())}


def timeout_error(what: str, src: int, timeout: float) -> CommTimeout:
    return CommTimeout(f"{what}: no message from rank {src} within {timeout:.1f} s (is rank {src} alive and running the same "
                       "operation? raise the timeout= of init_process_group/new_group if it is just slow)")
