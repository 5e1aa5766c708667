"""Tagged point-to-point messages for the non-collective topologies (gossip, parameter server).

:class:`Inbox` keeps one any-source receive posted on (channel, tag) with the transport
and stores every message that arrives, so a gossip round or a server can pick messages by
source and round, wait with a timeout, and be woken when a peer fails.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Sequence

from commlayer.transport import envelope
from commlayer.transport.engine import Transport
from commlayer.transport.envelope import Message


def buf(frame: Any) -> Any:
    """A buffer-protocol view of a received frame (the transport delivers memoryviews already)."""
    return getattr(frame, "buffer", frame)


def send_p2p(transport: Transport, dst: int, channel: str, tag: int, frames: Sequence[Any] = (), meta: dict | None = None,
             dtype: str = "", shape: Sequence[int] = ()) -> int:
    """Sends a tagged message to global rank ``dst``; returns the payload bytes."""
    h = envelope.p2p(channel, tag, transport.rank, dtype=dtype, shape=shape, meta=meta)
    frames = [buf(f) for f in frames]
    transport.send(dst, h, frames)
    return sum(memoryview(f).nbytes for f in frames)


class Inbox:
    """Every p2p message of (channel, tag) from any source, kept until taken.

    Args:
        transport: the process's transport.
        channel: channel name.
        tag: message tag.
    """

    def __init__(self, transport: Transport, channel: str, tag: int) -> None:
        self.transport, self.channel, self.tag = transport, channel, tag
        self._cond = threading.Condition()
        self._msgs: list[Message] = []
        self._error: BaseException | None = None
        self._plock = threading.Lock()
        self._posting = True
        self._again = False
        self._closed = False
        self._post_loop()

    # The callback may run synchronously inside post_p2p (message already there) or later on
    # whichever thread reads the socket; exactly one receive stays posted without recursion.
    def _on_message(self, msg: Message | None, err: BaseException | None) -> None:
        with self._cond:
            if err is not None:
                self._error = err
            elif msg is not None:
                self._msgs.append(msg)
            self._cond.notify_all()
        if err is not None or self._closed:
            return
        with self._plock:
            if self._posting:
                self._again = True
                return
            self._posting = True
        self._post_loop()

    def _post_loop(self) -> None:
        while True:
            with self._plock:
                self._again = False
            self.transport.post_p2p(self.channel, self.tag, None, self._on_message)
            with self._plock:
                if not self._again:
                    self._posting = False
                    return

    def wake(self) -> None:
        """Wakes every waiter (e.g. from a failure listener) so it re-checks its condition."""
        with self._cond:
            self._cond.notify_all()

    def take(self, match: Callable[[Message], bool], timeout: float, give_up: Callable[[], bool] | None = None) -> Message | None:
        """Removes and returns the first message satisfying ``match``; None after ``timeout`` s or once ``give_up()``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i, m in enumerate(self._msgs):
                    if match(m):
                        return self._msgs.pop(i)
                if self._error is not None:
                    raise self._error
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (give_up is not None and give_up()):
                    return None
                self._cond.wait(min(remaining, 0.1))

    def drain(self, match: Callable[[Message], bool]) -> list[Message]:
        """Removes and returns every message satisfying ``match`` (arrival order)."""
        with self._cond:
            out = [m for m in self._msgs if match(m)]
            if out:
                self._msgs = [m for m in self._msgs if not match(m)]
            return out

    def discard(self, match: Callable[[Message], bool]) -> None:
        self.drain(match)

    def close(self) -> None:
        self._closed = True
        self.wake()
