"""Runs a process group's collectives one after another, in the order they were issued.

Asynchronous operations (DDP buckets, ``async_op=True``) run on a background thread, so
communication overlaps with compute. A synchronous call made while nothing is queued runs
right in the caller's thread: it would block anyway, and skipping the thread hand-off cuts
latency.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections import deque
from typing import Callable

from commlayer.backend.work import ZmqWork

logger = logging.getLogger(__name__)

Job = Callable[[], None]


class Executor:
    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: deque[tuple[Job, ZmqWork]] = deque()
        self._cv = threading.Condition()
        self._busy = False
        self._stopped = False
        self._thread: threading.Thread | None = None

    def submit(self, job: Job, work: ZmqWork, inline: bool) -> None:
        with self._cv:
            if self._stopped:
                raise RuntimeError(f"{self._name}: the process group was shut down")
            run_here = inline and not self._busy and not self._queue
            if run_here:
                self._busy = True
            else:
                self._queue.append((job, work))
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name=f"commlayer-exec-{self._name}", daemon=True)
                    self._thread.start()
                self._cv.notify_all()
        if run_here:
            self._run_and_release(job, work)

    def _run_and_release(self, job: Job, work: ZmqWork) -> None:
        """Runs one operation (the caller set ``_busy``) and lets the next one go."""
        try:
            _run(job, work)
        finally:
            with self._cv:
                self._busy = False
                self._cv.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cv:
                # Never start while another operation runs (inline in a caller, too), even when stopping.
                while self._busy or (not self._stopped and not self._queue):
                    self._cv.wait(1.0)
                if self._stopped and not self._queue:
                    return
                job, work = self._queue.popleft()
                self._busy = True
            self._run_and_release(job, work)

    def stop(self, timeout: float = 10.0) -> None:
        """Lets queued operations finish (they fail fast once the transport is closed) and joins the thread."""
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("%s: executor thread did not stop within %.0f s", self._name, timeout)


def _run(job: Job, work: ZmqWork) -> None:
    try:
        job()
    except BaseException as exc:  # delivered to the waiter, never lost
        # Keep the traceback's lines but drop its frames' locals: they may hold views of received
        # buffers (shared-memory rings) that must be freed when the group shuts down.
        traceback.clear_frames(exc.__traceback__)
        work.set_error(exc)
    else:
        work.set_done()
