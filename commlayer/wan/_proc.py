"""A helper child process (``python -m commlayer.wan._child SERVICE FD``) driven over a socketpair.

A fresh interpreter rather than multiprocessing's spawn, so that callers' scripts need no
``if __name__ == "__main__"`` guard. The child receives one pickled payload, answers
``("ready", x)`` or ``("error", msg)``, then serves commands until ``"stop"``.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from multiprocessing.connection import Connection
from typing import Any

logger = logging.getLogger(__name__)


class ControlledChild:
    """Starts ``python -m commlayer.wan._child service FD``, sends ``payload``, waits for "ready".

    Attributes:
        ready_value: what the child sent with "ready".
    """

    def __init__(self, service: str, payload: Any, start_timeout_s: float = 30.0) -> None:
        a, b = socket.socketpair()
        self._conn, child = Connection(a.detach()), Connection(b.detach())
        self._closed = False
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", "commlayer.wan._child", service, str(child.fileno())],
                                          pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
        finally:
            child.close()
        try:
            self._conn.send(payload)
            if not self._conn.poll(start_timeout_s):
                raise RuntimeError(f"{service} did not start within {start_timeout_s} s")
            kind, value = self._conn.recv()
            if kind != "ready":
                raise RuntimeError(f"{service} failed to start: {value}")
            self.ready_value = value
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        """Process id of the child."""
        return self._proc.pid

    def call(self, cmd: str, timeout_s: float = 10.0) -> Any:
        """Sends a command and returns the child's reply payload."""
        self._conn.send(cmd)
        if not self._conn.poll(timeout_s):
            raise RuntimeError(f"child {self._proc.pid} did not answer {cmd!r} within {timeout_s} s")
        return self._conn.recv()[1]

    def close(self, timeout_s: float = 5.0) -> None:
        """Asks the child to stop, then kills it if it does not within ``timeout_s``; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._conn.send("stop")
            if self._conn.poll(timeout_s):
                self._conn.recv()
        except (OSError, EOFError):
            pass
        try:
            self._proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("child %d did not stop; killing it", self._proc.pid)
            self._proc.kill()
            self._proc.wait(timeout=timeout_s)
        self._conn.close()
