"""A relay for peers behind NAT: a public host splicing TCP streams, so CurveZMQ stays end to end.

A peer that can only dial out asks the relay's control port for a pair of ports (``OPEN <id>``;
the relay answers ``<backend> <front-host> <front>`` and keeps the pair while the control
connection stays open). Its state server's ROUTER then *connects* to the backend port (ZeroMQ
reconnects it after every session), and the peer publishes ``tcp://<front-host>:<front>`` as its
relayed endpoint. A joiner that cannot reach the peer directly dials the front port; the relay
pairs that connection with an idle backend connection and copies bytes both ways without reading
them. The CURVE handshake and every frame are between the two peers: the relay holds no key and
sees ciphertext only (tests/test_fleet_netns.py captures its traffic to check).
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

IDLE_WAIT = 10.0  # seconds a front connection waits for an idle backend connection


@dataclass
class _Pair:
    peer: int
    control: socket.socket
    backend: socket.socket
    front: socket.socket
    idle: list[tuple[socket.socket, bytearray]] = field(default_factory=list)
    waiting: list[tuple[socket.socket, float]] = field(default_factory=list)


class Relay:
    """The relay (a thread with one selector). Args: bind host, control port (0 = any), front host to announce."""

    def __init__(self, host: str = "0.0.0.0", port: int = 0, front_host: str = "127.0.0.1") -> None:
        self.front_host = front_host
        self._sel = selectors.DefaultSelector()
        self._host = host
        self._ctl = self._listen(port)
        self.port = self._ctl.getsockname()[1]
        self._sel.register(self._ctl, selectors.EVENT_READ, ("control-listen", None))
        self._pairs: dict[int, _Pair] = {}
        self._links: dict[socket.socket, socket.socket] = {}
        self.forwarded = 0
        self.sessions = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-relay", daemon=True)
        self._thread.start()

    def _listen(self, port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self._host, port))
        s.listen(16)
        s.setblocking(False)
        return s

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(0.1):
                kind, pair = key.data
                try:
                    getattr(self, "_on_" + kind.replace("-", "_"))(key.fileobj, pair)
                except OSError as exc:
                    logger.info("fleet relay: %s failed (%s)", kind, exc)
                    self._drop(key.fileobj)  # type: ignore[arg-type]
            self._expire()

    def _on_control_listen(self, sock: socket.socket, _p: object) -> None:
        conn, _ = sock.accept()
        conn.settimeout(5.0)
        line = conn.recv(256).decode(errors="replace").split()
        if len(line) != 2 or line[0] != "OPEN" or not line[1].isdigit():
            conn.sendall(b"ERR expected OPEN <peer id>\n")
            conn.close()
            return
        peer = int(line[1])
        old = self._pairs.pop(peer, None)
        if old is not None:
            self._close_pair(old)
        pair = _Pair(peer, conn, self._listen(0), self._listen(0))
        self._pairs[peer] = pair
        conn.setblocking(False)
        self._sel.register(conn, selectors.EVENT_READ, ("control", pair))
        self._sel.register(pair.backend, selectors.EVENT_READ, ("backend_listen", pair))
        self._sel.register(pair.front, selectors.EVENT_READ, ("front_listen", pair))
        conn.sendall(f"{pair.backend.getsockname()[1]} {self.front_host} {pair.front.getsockname()[1]}\n".encode())
        logger.info("fleet relay: peer %d relayed at %s:%d", peer, self.front_host, pair.front.getsockname()[1])

    def _on_control(self, sock: socket.socket, pair: _Pair) -> None:
        if not sock.recv(256):  # the peer went away: its pair goes too
            self._pairs.pop(pair.peer, None)
            self._close_pair(pair)

    def _on_backend_listen(self, sock: socket.socket, pair: _Pair) -> None:
        conn, _ = sock.accept()
        conn.setblocking(False)
        buf = bytearray()
        pair.idle.append((conn, buf))
        self._sel.register(conn, selectors.EVENT_READ, ("idle", pair))
        self._match(pair)

    def _on_idle(self, sock: socket.socket, pair: _Pair) -> None:
        data = sock.recv(65536)  # the server's greeting, kept until a client arrives
        for c, buf in pair.idle:
            if c is sock:
                if not data:
                    pair.idle.remove((c, buf))
                    self._sel.unregister(sock)
                    sock.close()
                else:
                    buf += data
                return

    def _on_front_listen(self, sock: socket.socket, pair: _Pair) -> None:
        conn, _ = sock.accept()
        conn.setblocking(False)
        pair.waiting.append((conn, time.monotonic()))
        self._match(pair)

    def _match(self, pair: _Pair) -> None:
        while pair.idle and pair.waiting:
            (back, buf), (front, _) = pair.idle.pop(0), pair.waiting.pop(0)
            self._sel.unregister(back)
            self._links[back], self._links[front] = front, back
            self._sel.register(back, selectors.EVENT_READ, ("data", None))
            self._sel.register(front, selectors.EVENT_READ, ("data", None))
            if buf:
                front.sendall(bytes(buf))
            self.sessions += 1

    def _on_data(self, sock: socket.socket, _p: object) -> None:
        data = sock.recv(1 << 16)
        other = self._links.get(sock)
        if not data or other is None:
            self._drop(sock)
            return
        other.setblocking(True)  # simple back-pressure: the copy waits for the slower side
        other.sendall(data)
        other.setblocking(False)
        self.forwarded += len(data)

    def _drop(self, sock: socket.socket) -> None:
        other = self._links.pop(sock, None)
        for s in (sock, other):
            if s is None:
                continue
            self._links.pop(s, None)
            try:
                self._sel.unregister(s)
            except (KeyError, ValueError):
                pass
            s.close()

    def _expire(self) -> None:
        now = time.monotonic()
        for pair in self._pairs.values():
            for conn, t in list(pair.waiting):
                if now - t > IDLE_WAIT:
                    pair.waiting.remove((conn, t))
                    conn.close()

    def _close_pair(self, pair: _Pair) -> None:
        for s in [pair.control, pair.backend, pair.front, *(c for c, _ in pair.idle), *(c for c, _ in pair.waiting)]:
            try:
                self._sel.unregister(s)
            except (KeyError, ValueError):
                pass
            s.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for pair in list(self._pairs.values()):
            self._close_pair(pair)
        for s in list(self._links):
            self._drop(s)
        self._ctl.close()
        self._sel.close()


def open_relay(relay: str, peer: int, timeout: float = 10.0) -> tuple[socket.socket, str, str]:
    """Asks the relay at ``host:port`` for a port pair; returns (control socket to keep open, backend, front).

    Raises:
        ConnectionError: the relay refused or did not answer (names it).
    """
    host, _, port = relay.rpartition(":")
    try:
        ctl = socket.create_connection((host, int(port)), timeout=timeout)
        ctl.sendall(f"OPEN {peer}\n".encode())
        answer = ctl.recv(256).decode().split()
    except (OSError, ValueError) as exc:
        raise ConnectionError(f"fleet peer {peer}: relay {relay} did not answer ({exc}); is `commlayer fleet-relay` "
                              "running there and reachable (COMMLAYER_FLEET_RELAY)?") from None
    if len(answer) != 3:
        ctl.close()
        raise ConnectionError(f"fleet peer {peer}: relay {relay} refused: {' '.join(answer)}")
    ctl.settimeout(None)
    return ctl, f"tcp://{host}:{answer[0]}", f"tcp://{answer[1]}:{answer[2]}"
