"""Flow control: a bound on the payload bytes queued inside ZeroMQ towards one peer.

ZeroMQ accepts messages until its high-water mark (a count, not bytes), so on a 2 Mbit/s link
a sender could park gigabytes in its queue. Every large frame is sent zero-copy with a tracker;
ZeroMQ releases a frame once it is written to the kernel, and its queue is FIFO, so the bytes
still queued are those of the frames whose trackers are not done. A send that would exceed
``limit`` waits (in short slices, watching the peer's health) until enough has left; one message
is always admitted into an empty queue, whatever its size.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

import zmq

from commlayer.transport.errors import CommTimeout


class SendQueue:
    """Bytes in flight inside ZeroMQ towards one peer.

    Args:
        limit: most payload bytes queued before a sender waits (0 = unbounded).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._q: deque[tuple[zmq.MessageTracker, int]] = deque()
        self._lock = threading.Lock()
        self.queued = 0
        self.peak = 0
        self.waits = 0

    def _reap(self) -> zmq.MessageTracker | None:
        """Forgets finished frames; returns the oldest pending tracker (caller holds the lock)."""
        while self._q and self._q[0][0].done:
            self.queued -= self._q.popleft()[1]
        return self._q[0][0] if self._q else None

    def admit(self, nbytes: int, deadline: float, check: Callable[[], None], what: str) -> None:
        """Waits until ``nbytes`` more fit under the limit (or the queue is empty).

        Args:
            nbytes: payload bytes about to be sent.
            deadline: ``time.monotonic()`` after which to give up.
            check: raises if waiting is pointless (the peer failed, the transport closed).
            what: the operation, for the timeout message.

        Raises:
            CommTimeout: the queue did not drain before ``deadline``.
        """
        if not self.limit:
            return
        waited = False
        while True:
            with self._lock:
                oldest = self._reap()
                if oldest is None or self.queued + nbytes <= self.limit:
                    return
            if not waited:
                waited = True
                self.waits += 1
            check()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CommTimeout(f"{what}: {self.queued} bytes still queued towards the peer after the timeout "
                                  f"(limit {self.limit} bytes, COMMLAYER_SEND_QUEUE_BYTES); the link or the peer is stuck")
            try:
                oldest.wait(min(remaining, 0.05))
            except zmq.NotDone:
                pass

    def add(self, tracker: zmq.MessageTracker, nbytes: int) -> None:
        """Records a sent message whose last large frame is tracked by ``tracker``."""
        with self._lock:
            self._q.append((tracker, nbytes))
            self.queued += nbytes
            self.peak = max(self.peak, self.queued)
            self._reap()
