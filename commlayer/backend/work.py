"""The Work handle returned by every operation of the zmq process group."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from commlayer.transport.errors import CommError, CommTimeout


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
        self._raw = torch.futures.Future()
        self._fut = self._raw.then(_unwrap)
        self._source: int = -1
        self._lock = threading.Lock()

    # ---- completion (called by the executor or the I/O thread) ------------------------------
    def set_done(self, outputs: list[torch.Tensor] | None = None) -> None:
        with self._lock:
            if self._event.is_set():
                return
            if outputs is not None:
                self._outputs = outputs
            self._event.set()
        self._raw.set_result(self._outputs)

    def set_error(self, error: BaseException) -> None:
        if not str(error).startswith(self._what):
            try:
                error = type(error)(f"{self._what}: {error}")
            except Exception:  # exception types with other constructors keep their message
                pass
        with self._lock:
            if self._event.is_set():
                return
            self._error = error
            self._event.set()
        self._raw.set_result(error)

    # ---- torch API ------------------------------------------------------------------------
    def wait(self, timeout: timedelta | None = None) -> bool:
        secs = self._timeout
        if timeout is not None and timeout.total_seconds() > 0:
            secs = timeout.total_seconds()
        # Operations bound their own waits by the group timeout; the margin covers their cleanup.
        if not self._event.wait(secs + 5.0):
            raise CommTimeout(f"{self._what}: not complete after {secs:.1f} s")
        if self._error is not None:
            raise self._error
        return True

    def get_future(self) -> torch.futures.Future:
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
