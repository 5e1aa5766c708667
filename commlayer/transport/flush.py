"""A flush handle: tells when ZeroMQ no longer reads the zero-copy buffers a send handed it."""

from __future__ import annotations

import time
from typing import Any, Callable

import zmq

from commlayer.transport.errors import CommTimeout, rewrap


class Flush:
    """Pending zero-copy sends of one operation (zmq trackers stay inside the transport)."""

    __slots__ = ("_pending",)

    def __init__(self, peer: int = -1, trackers: list[Any] | None = None) -> None:
        self._pending: list[tuple[int, Any]] = [(peer, t) for t in trackers or ()]

    def add(self, peer: int, trackers: list[Any]) -> None:
        self._pending.extend((peer, t) for t in trackers)

    def extend(self, other: "Flush") -> None:
        self._pending.extend(other._pending)

    def __bool__(self) -> bool:
        return bool(self._pending)

    def wait(self, timeout: float, failure: Callable[[int], BaseException | None], what: str) -> None:
        """Waits until every buffer is released.

        Args:
            timeout: seconds in all.
            failure: ``failure(peer)`` is the error that makes the peer's data undeliverable, or None.
            what: the operation, for messages.

        Raises:
            PeerFailure (or the channel's abort error): a destination failed, so its data never drains.
            CommTimeout: not drained within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        try:
            for peer, tr in self._pending:
                while not tr.done:
                    err = failure(peer)
                    if err is not None:
                        raise rewrap(err, f"{what}: data for rank {peer} cannot be delivered: {err}")
                    if time.monotonic() > deadline:
                        raise CommTimeout(f"{what}: data for rank {peer} not flushed within {timeout:.0f} s")
                    try:
                        tr.wait(0.05)
                    except zmq.NotDone:
                        pass
        finally:
            self._pending.clear()
