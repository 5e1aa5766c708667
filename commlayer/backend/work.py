"""The Work handle returned by every operation of the zmq process group."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from commlayer.transport.errors import CommError, CommTimeout, rewrap


def timed_out_message(what: str, seconds: float, detail: str = "") -> str:
    """Timeout wording compatible with gloo's ("Timed out waiting <ms>ms for ..."), which user code matches."""
    tail = f": {detail}" if detail else ""
    return f"{what}: Timed out waiting {max(1, round(seconds * 1000))}ms (timeout) for the operation to complete{tail}"


def _unwrap(fut: torch.futures.Future) -> Any:
    value = fut.value()
    if isinstance(value, BaseException):
        raise value
    return value


class ZmqWork(dist._Work):
    """Completion handle of one operation.

    ``wait()`` raises the operation's error; ``get_future()`` completes with the output tensors
    (and fails, as seen from C++ too, when the operation fails).
    """

    def __init__(self, outputs: list[torch.Tensor], what: str, default_timeout: float) -> None:
        super().__init__()
        self._outputs = outputs
        self._what = what
        self._timeout = default_timeout
        self._event = threading.Event()
        self._error: BaseException | None = None
        # Made on demand: synchronous calls never ask for a future, and making one costs ~10 us.
        self._raw: torch.futures.Future | None = None
        self._fut: torch.futures.Future | None = None
        self._source: int = -1
        self._lock = threading.Lock()
        self._done = False  # decided under the lock; the event is set only after the future is complete
        # Set for operations without a deadline of their own (point-to-point receives): called when a
        # wait gives up, it withdraws the operation (returns False if it completed meanwhile).
        self.on_timeout: Callable[[], bool] | None = None

    # ---- completion (called by the executor or the I/O thread) ------------------------------
    def set_done(self, outputs: list[torch.Tensor] | None = None) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
            if outputs is not None:
                self._outputs = outputs
            raw = self._raw
        if raw is not None:
            raw.set_result(self._outputs)
        self._event.set()  # last: whoever returns from wait() finds get_future() already complete

    def set_error(self, error: BaseException) -> None:
        if not str(error).startswith(self._what):
            error = rewrap(error, f"{self._what}: {error}")
        with self._lock:
            if self._done:
                return
            self._done = True
            self._error = error
            raw = self._raw
        if raw is not None:
            raw.set_result(error)
        self._event.set()

    # ---- torch API ------------------------------------------------------------------------
    def wait(self, timeout: timedelta | None = None) -> bool:
        """Waits for completion: ``timeout`` if given (> 0), else the group timeout.

        Raises:
            CommTimeout: not complete in time (a receive is then withdrawn, so it cannot swallow a
                later message); or the operation's own error.
        """
        explicit = timeout is not None and timeout.total_seconds() > 0
        secs = timeout.total_seconds() if explicit else self._timeout
        # Collectives bound their own waits by the group timeout; without an explicit timeout a small
        # margin lets them report their own, more precise error first.
        margin = 0.0 if explicit or self.on_timeout is not None else 5.0
        if not self._event.wait(secs + margin):
            if self.on_timeout is None or self.on_timeout():
                raise CommTimeout(timed_out_message(self._what, secs))
            self._event.wait(1.0)  # it completed while being withdrawn
        if self._error is not None:
            raise self._error
        return True

    def get_future(self) -> torch.futures.Future:
        """Completes with the output tensors; fails (as C++ sees it too) if the operation fails."""
        with self._lock:
            if self._fut is None:
                self._raw = torch.futures.Future()
                self._fut = self._raw.then(_unwrap)
                done = self._done
            else:
                return self._fut
        if done:  # completed before anyone asked: complete the new future now
            self._raw.set_result(self._error if self._error is not None else self._outputs)
        return self._fut

    def is_completed(self) -> bool:
        return self._event.is_set()

    def is_success(self) -> bool:
        return self._event.is_set() and self._error is None

    def exception(self) -> BaseException | None:
        return self._error

    def result(self) -> list[torch.Tensor]:
        self.wait()
        return self._outputs

    def synchronize(self) -> None:
        self.wait()

    def _source_rank(self) -> int:
        if self._source < 0:
            raise CommError(f"{self._what}: no source rank (not a completed receive from any source)")
        return self._source

    source_rank = _source_rank


def completed_work(outputs: list[torch.Tensor], what: str, timeout: float) -> ZmqWork:
    w = ZmqWork(outputs, what, timeout)
    w.set_done()
    return w
