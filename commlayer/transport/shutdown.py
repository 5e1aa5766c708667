"""Closing the transport: goodbyes, close hooks, flushing, and freeing every socket, thread, descriptor and file.

Mixed into :class:`commlayer.transport.engine.Transport`, whose attributes it uses.
"""

from __future__ import annotations

import logging
from typing import Any

import zmq

from commlayer.transport import envelope
from commlayer.transport.state import TransportState
from commlayer.transport.errors import TransportClosed
from commlayer.transport.wire import Kind

logger = logging.getLogger("commlayer.transport.engine")

_HELLO = "__hello__"


class Shutdown(TransportState):
    """``close()`` of the transport."""

    def close(self, reason: str = "") -> None:
        """Says goodbye to every peer (early on the control connection, then behind the data), runs the close
        hooks, flushes (up to ``linger`` s), and frees sockets and threads.

        Args:
            reason: why this rank leaves (e.g. the failure that broke its group); peers still
                waiting for it put it in their error, so the root cause travels to every rank
                (with the first rank this rank found failed, ``first_failure``, for the blame).
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        meta: dict[str, Any] = {"reason": reason[:1000]} if reason else {}
        if self.first_failure is not None:
            meta["failed"] = self.first_failure
        self._say_goodbye_early(meta)
        for p in self._peers.values():
            if p.state in ("connecting", "connected"):
                try:
                    with p.lock:
                        p.sock.send(envelope.control(Kind.BYE, _HELLO, self.rank, meta=meta).pack(), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
        self._closing.set()
        self._rx.stop(timeout=10)
        self.mailbox.close(TransportClosed(f"rank {self.rank}: the commlayer transport was shut down"))
        for hook in self._close_hooks:
            try:
                hook()
            except Exception:  # pragma: no cover - best effort, the sockets must still close
                logger.warning("rank %d: a close hook failed", self.rank, exc_info=True)
        with self._rx.socket_released(2.0):  # let a thread inside the receiver's read leave the socket
            linger = int(self.config.linger * 1000)
            for p in self._peers.values():
                with p.lock:
                    p.sock.close(linger=0 if p.state == "dead" else linger)
            for p in self._peers.values():
                if p.monitor is not None:
                    p.monitor.close(linger=0)
            self._live_close()
            self._rx.close_pipes()
            self._router.close(linger=0)
            if self._auth is not None:
                self._auth.stop()
            self._ctx.term()
        for p in self._peers.values():
            if p.shm_out is not None:
                p.shm_out.close()
            if p.shm_in is not None:
                p.shm_in.close()
        self.release_ipc_path()
