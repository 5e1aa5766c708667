"""Bounded mailboxes: messages that arrive before anyone asks for them wait here.

Collective messages are matched on an exact key (channel, seq, step, chunk, src). Point-to-point
messages are matched in order per (channel, tag), MPI style, so ``irecv`` posted before the
message arrives and ``recv`` from any source both work.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from commlayer.transport.errors import CommTimeout, PeerFailure, TransportClosed, WireError
from commlayer.transport.wire import Header

Key = tuple[str, int, int, int, int]  # channel, seq, step, chunk, src


@dataclass(slots=True)
class Message:
    """A received message: its validated header and payload frames (buffer-protocol objects)."""

    header: Header
    frames: list[Any]

    @property
    def nbytes(self) -> int:
        return sum(self.header.nbytes)


class _Waiter:
    __slots__ = ("event", "msg", "error", "src")

    def __init__(self, src: int | None) -> None:
        self.event = threading.Event()
        self.msg: Message | None = None
        self.error: BaseException | None = None
        self.src = src


class _Posted:
    __slots__ = ("src", "callback")

    def __init__(self, src: int | None, callback: Callable[[Message | None, BaseException | None], None]) -> None:
        self.src = src
        self.callback = callback


class Mailbox:
    """Thread-safe store of early messages with blocking, timed retrieval.

    Args:
        max_bytes: bound on the payload bytes held for operations not started yet.
        max_messages: bound on the number of such messages.
    """

    def __init__(self, max_bytes: int, max_messages: int) -> None:
        self._lock = threading.Lock()
        self._box: dict[Key, Message] = {}
        self._waiters: dict[Key, _Waiter] = {}
        self._p2p: dict[tuple[str, int], deque[Message]] = {}
        self._posted: dict[tuple[str, int], deque[_Posted]] = {}
        self._dead: dict[int, str] = {}
        self._aborted: dict[str, BaseException] = {}
        self._closed: BaseException | None = None
        self._bytes = 0
        self.max_bytes = max_bytes
        self.max_messages = max_messages

    # ---- delivery (I/O thread) -------------------------------------------------------------
    def deliver(self, msg: Message) -> None:
        h = msg.header
        if h.op == "p2p":
            self._deliver_p2p(msg)
            return
        key = (h.channel, h.seq, h.step, h.chunk, h.src)
        with self._lock:
            if h.channel in self._aborted or self._closed is not None:
                return
            waiter = self._waiters.pop(key, None)
            if waiter is not None:
                waiter.msg = msg
                waiter.event.set()
                return
            if key in self._box:
                raise WireError(f"duplicate message from rank {h.src} for {h.op} #{h.seq} step {h.step} chunk {h.chunk} in channel {h.channel!r}")
            self._check_bounds(msg)
            self._box[key] = msg
            self._bytes += msg.nbytes

    def _check_bounds(self, msg: Message) -> None:
        if len(self._box) + 1 > self.max_messages or self._bytes + msg.nbytes > self.max_bytes:
            raise WireError(
                f"mailbox full: rank {msg.header.src} sent {msg.header.op} #{msg.header.seq} ahead of this rank while "
                f"{len(self._box)} messages / {self._bytes} bytes already wait (limits {self.max_messages} messages, "
                f"{self.max_bytes} bytes; raise COMMLAYER_MAILBOX_BYTES or make ranks issue the same operations)")

    def _deliver_p2p(self, msg: Message) -> None:
        h = msg.header
        qkey = (h.channel, h.seq)
        with self._lock:
            if h.channel in self._aborted or self._closed is not None:
                return
            posted = self._posted.get(qkey, deque())
            match = next((p for p in posted if p.src is None or p.src == h.src), None)
            if match is None:
                self._check_bounds(msg)
                self._p2p.setdefault(qkey, deque()).append(msg)
                self._bytes += msg.nbytes
                return
            posted.remove(match)
        match.callback(msg, None)

    # ---- retrieval (operation threads) ---------------------------------------------------
    def _pop(self, key: Key, what: str) -> Message | None:
        """Caller holds the lock: the message if here, None if not yet; raises if it never will be."""
        msg = self._box.pop(key, None)
        if msg is not None:
            self._bytes -= msg.nbytes
            return msg
        self._raise_if_failed(key[0], key[4], what)
        return None

    def try_take(self, key: Key, what: str) -> Message | None:
        """Returns the message with ``key`` if it is here, None if not yet; raises if it never will be."""
        with self._lock:
            return self._pop(key, what)

    def wait_for(self, key: Key, timeout: float, what: str) -> Message | None:
        """Waits up to ``timeout`` for someone else to deliver ``key``; None on expiry."""
        with self._lock:
            msg = self._pop(key, what)
            if msg is not None:
                return msg
            waiter = _Waiter(key[4])
            self._waiters[key] = waiter
        waiter.event.wait(timeout)
        with self._lock:
            if self._waiters.get(key) is waiter:
                del self._waiters[key]
        if waiter.error is not None:
            if isinstance(waiter.error, PeerFailure) and waiter.error.peer == key[4]:
                raise PeerFailure(f"{what}: {waiter.error}", peer=key[4])
            raise waiter.error
        return waiter.msg

    def take(self, key: Key, timeout: float, what: str) -> Message:
        """Waits for the message with ``key`` (delivered by another thread).

        Raises:
            CommTimeout, PeerFailure, TransportClosed, or the channel's abort error.
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            msg = self.wait_for(key, max(0.0, remaining), what)
            if msg is not None:
                return msg
            if remaining <= 0:
                raise timeout_error(what, key[4], timeout)

    def post_p2p(self, channel: str, tag: int, src: int | None,
                 callback: Callable[[Message | None, BaseException | None], None]) -> None:
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
                            self._bytes -= m.nbytes
                            break
                if msg is None:
                    self._posted.setdefault(qkey, deque()).append(_Posted(src, callback))
                    return
        callback(msg, err)

    def cancel_p2p(self, channel: str, tag: int, callback: Callable[[Message | None, BaseException | None], None]) -> bool:
        """Withdraws a posted receive; False if it was already matched (or failed)."""
        with self._lock:
            posted = self._posted.get((channel, tag))
            if posted:
                for p in posted:
                    if p.callback is callback:
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
            return PeerFailure(f"rank {src} is gone: {self._dead[src]}", peer=src)
        return None

    def _raise_if_failed(self, channel: str, src: int, what: str) -> None:
        err = self._failure_for(channel, src)
        if err is not None:
            if isinstance(err, PeerFailure) and err.peer == src and channel not in self._aborted:
                raise PeerFailure(f"{what}: {err}", peer=src)
            raise err

    def peer_failed(self, peer: int, reason: str) -> None:
        """Fails every wait on ``peer``; later waits on it fail at once."""
        callbacks = []
        with self._lock:
            self._dead.setdefault(peer, reason)
            for key, w in list(self._waiters.items()):
                if w.src == peer:
                    del self._waiters[key]
                    w.error = PeerFailure(f"rank {peer} failed while this rank waited for it ({reason})", peer=peer)
                    w.event.set()
            for posted in self._posted.values():
                for p in list(posted):
                    if p.src == peer:
                        posted.remove(p)
                        callbacks.append(p.callback)
        err = PeerFailure(f"rank {peer} failed ({reason})", peer=peer)
        for cb in callbacks:
            cb(None, err)

    def failure_for(self, channel: str, src: int | None) -> BaseException | None:
        """The error a wait on ``src`` in ``channel`` would raise now, or None."""
        with self._lock:
            return self._failure_for(channel, src)

    def peer_is_dead(self, peer: int) -> bool:
        with self._lock:
            return peer in self._dead

    def abort_channel(self, channel: str, error: BaseException) -> None:
        """Fails every pending and later wait on ``channel`` with ``error``."""
        self._fail(lambda key_channel: key_channel == channel, error, channel)

    def close(self, error: BaseException | None = None) -> None:
        self._fail(lambda _c: True, error or TransportClosed("transport closed"), None)

    def _fail(self, match: Callable[[str], bool], error: BaseException, channel: str | None) -> None:
        callbacks = []
        with self._lock:
            if channel is None:
                self._closed = error
            else:
                self._aborted.setdefault(channel, error)
            for key, w in list(self._waiters.items()):
                if match(key[0]):
                    del self._waiters[key]
                    w.error = error
                    w.event.set()
            for (ch, _tag), posted in self._posted.items():
                if match(ch):
                    callbacks.extend(p.callback for p in posted)
                    posted.clear()
            for key in [k for k in self._box if match(k[0])]:
                self._bytes -= self._box.pop(key).nbytes
            for qkey in [k for k in self._p2p if match(k[0])]:
                self._bytes -= sum(m.nbytes for m in self._p2p.pop(qkey))
        for cb in callbacks:
            cb(None, error)

    def drop_channel(self, channel: str) -> None:
        """Forgets buffered messages of a finished channel (no error for anyone)."""
        with self._lock:
            for key in [k for k in self._box if k[0] == channel]:
                self._bytes -= self._box.pop(key).nbytes

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"messages": len(self._box) + sum(len(q) for q in self._p2p.values()), "bytes": self._bytes,
                    "waiters": len(self._waiters)}


def timeout_error(what: str, src: int, timeout: float) -> CommTimeout:
    return CommTimeout(f"{what}: no message from rank {src} within {timeout:.1f} s (is rank {src} alive and running the same "
                       "operation? raise the timeout= of init_process_group/new_group if it is just slow)")
