"""The relay event loop: asyncio protocols forwarding TCP streams through :class:`LinkPipe` s.

One listener per directed link i->j (on loopback) accepts rank i's connections and connects
each to rank j's real endpoint. Bytes read from rank i's side go through link i->j; bytes read
from rank j's side of the same connection go through link j->i. Pipes are per directed link,
so every connection on a link shares its rate.
"""

from __future__ import annotations

import asyncio
import logging
import select
import selectors
import socket
from collections import deque
from typing import Any

from commlayer.wan.matrix import LinkMatrix
from commlayer.wan.pipe import LinkPipe

logger = logging.getLogger(__name__)

_EOF = b""  # marker: shut down writing on the destination
_RCVBUF = 256 * 1024
# Release a chunk this much before its time at most (covers the wake-up latency of the loop).
_EARLY_S = 0.0001


class PreciseEpollSelector(selectors.EpollSelector):
    """Epoll selector whose timeouts have microsecond, not millisecond, resolution.

    epoll_wait takes whole milliseconds (and Python rounds up twice, so a wait can overshoot by
    up to 2 ms). Waiting in select() on the epoll fd itself (microsecond timeout) and then
    collecting events with a zero timeout keeps every emulated delay within ~0.1 ms.
    """

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        fd = self.fileno()
        if timeout is not None and timeout > 0 and fd < 1024:
            select.select([fd], [], [], timeout)
            timeout = 0
        return super().select(timeout)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """An asyncio loop on :class:`PreciseEpollSelector`."""
    return asyncio.SelectorEventLoop(PreciseEpollSelector())


class _Link:
    """A directed link: its pipe, the FIFO of chunks in flight, and back-pressure."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pipe: LinkPipe) -> None:
        self.loop = loop
        self.pipe = pipe
        self.q: deque[tuple[float, _Conn, bytes | None]] = deque()
        self.queued = 0
        self.timer: asyncio.TimerHandle | None = None
        self.blocked: set[_Conn] = set()

    def limit(self, now: float) -> float:
        """Most bytes held in the pipe (in flight + buffer) before sources are paused."""
        p = self.pipe.spec.at(now - self.pipe.t0)
        hold = 2 * p.delay_ms / 1000.0 + 4 * p.jitter_ms / 1000.0 + self.pipe.queue_s(now)
        rate = self.pipe.rate_bytes_per_s(now)
        return max(65536.0, min(rate * hold, 256e6))

    def push(self, src: "_Conn", dst: "_Conn", data: bytes) -> None:
        now = self.loop.time()
        step = self.pipe.chunk_bytes(now)
        for off in range(0, len(data), step):
            chunk = data[off:off + step]
            release = self.pipe.admit(len(chunk), now)
            assert release is not None  # stream mode never drops
            self.q.append((release, dst, chunk))
            self.queued += len(chunk)
        self._arm()
        if self.queued > self.limit(now):
            self.blocked.add(src)
            src.pause("link")

    def push_marker(self, dst: "_Conn", marker: bytes | None) -> None:
        """Queues EOF (``_EOF``) or close (``None``) behind the data already in flight."""
        self.q.append((max(self.pipe.last_release, self.loop.time()), dst, marker))
        self._arm()

    def _arm(self) -> None:
        if self.q and self.timer is None:
            self.timer = self.loop.call_at(self.q[0][0] - _EARLY_S, self._fire)

    def _fire(self) -> None:
        self.timer = None
        now = self.loop.time()
        q = self.q
        while q and q[0][0] <= now + _EARLY_S:
            _, dst, chunk = q.popleft()
            if chunk:
                self.queued -= len(chunk)
            dst.deliver(chunk)
        self._arm()
        if self.blocked and self.queued <= self.limit(now) / 2:
            for src in self.blocked:
                src.resume("link")
            self.blocked.clear()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.q.clear()
        self.blocked.clear()


class _Conn(asyncio.Protocol):
    """One socket of a relayed connection; ``link_out`` shapes the bytes read from it."""

    def __init__(self, core: "RelayCore", link_out: _Link) -> None:
        self.core = core
        self.link_out = link_out
        self.peer: _Conn | None = None
        self.transport: asyncio.Transport | None = None
        self.reasons: set[str] = set()
        self.eof_in = self.eof_out = self.closed = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.core.conns.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
        if self.reasons:
            transport.pause_reading()

    def pause(self, reason: str) -> None:
        if not self.reasons and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.reasons.add(reason)

    def resume(self, reason: str) -> None:
        self.reasons.discard(reason)
        if not self.reasons and self.transport is not None and not self.closed and not self.eof_in:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None
        self.link_out.push(self, self.peer, data)

    def eof_received(self) -> bool:
        self.eof_in = True
        assert self.peer is not None
        self.link_out.push_marker(self.peer, _EOF)
        self._maybe_close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.core.conns.discard(self)
        self.link_out.blocked.discard(self)
        if self.peer is not None and not self.peer.closed:
            self.link_out.push_marker(self.peer, None)

    def deliver(self, chunk: bytes | None) -> None:
        if self.closed or self.transport is None:
            return
        if chunk is None:
            self.transport.close()
        elif chunk == _EOF:
            self.eof_out = True
            if self.transport.can_write_eof():
                try:
                    self.transport.write_eof()
                except OSError:  # the other side is already gone: nothing left to tell it
                    pass
            self._maybe_close()
        else:
            self.transport.write(chunk)

    def _maybe_close(self) -> None:
        if self.eof_in and self.eof_out and self.transport is not None:
            self.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause("dst")

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume("dst")


class RelayCore:
    """All relays of one world, on one asyncio loop.

    Args:
        links: the world's link matrix.
        targets: per rank, the ``(host, port)`` its real endpoint listens on.
        t0: ``loop.time()``-compatible (``time.monotonic``) start of the schedule.
        seed: base seed; link i->j uses ``seed * 1_000_003 + i * 1009 + j``.
        host: address the relay listeners bind.
    """

    def __init__(self, links: LinkMatrix, targets: list[tuple[str, int]], t0: float, seed: int,
                 host: str = "127.0.0.1") -> None:
        self.links = links
        self.targets = targets
        self.t0 = t0
        self.seed = seed
        self.host = host
        self.conns: set[_Conn] = set()
        self.link_objs: dict[tuple[int, int], _Link] = {}
        self.servers: dict[tuple[int, int], asyncio.AbstractServer] = {}

    async def start(self) -> dict[tuple[int, int], int]:
        """Creates the pipes and listeners; returns the relay port of every directed link."""
        loop = asyncio.get_running_loop()
        m = self.links
        for i, j, spec in m.pairs():
            rev = m.link(j, i)
            pipe = LinkPipe(spec, self.t0, self.seed * 1_000_003 + i * 1009 + j, stream=True,
                            reverse_delay_ms=lambda t, r=rev: r.at(t).delay_ms)  # type: ignore[misc]
            self.link_objs[(i, j)] = _Link(loop, pipe)
        ports = {}
        for (i, j) in self.link_objs:
            srv = await loop.create_server(lambda i=i, j=j: self._accept(i, j), self.host, 0,  # type: ignore[misc]
                                           reuse_address=True, backlog=128)
            self.servers[(i, j)] = srv
            ports[(i, j)] = srv.sockets[0].getsockname()[1]
        return ports

    def _accept(self, i: int, j: int) -> _Conn:
        a = _Conn(self, self.link_objs[(i, j)])
        b = _Conn(self, self.link_objs[(j, i)])
        a.peer, b.peer = b, a
        a.reasons.add("connecting")
        asyncio.get_running_loop().create_task(self._connect(a, b, j))
        return a

    async def _connect(self, a: _Conn, b: _Conn, j: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.create_connection(lambda: b, *self.targets[j]), timeout=10.0)
        except (OSError, asyncio.TimeoutError) as exc:
            logger.debug("relay to rank %d at %s failed: %s", j, self.targets[j], exc)
            if a.transport is not None:
                a.transport.close()
            return
        a.resume("connecting")

    def stats(self) -> dict[tuple[int, int], dict[str, float]]:
        """Per directed link: bytes and chunks admitted, stalls, bytes still queued."""
        return {k: {"bytes": lk.pipe.bytes, "units": lk.pipe.units, "stalls": lk.pipe.stalls,
                    "queued": lk.queued} for k, lk in self.link_objs.items()}

    async def stop(self) -> None:
        """Closes listeners, connections and timers."""
        for srv in self.servers.values():
            srv.close()
        for c in list(self.conns):
            if c.transport is not None:
                c.transport.abort()
        for link in self.link_objs.values():
            link.close()
        for srv in self.servers.values():
            try:
                await asyncio.wait_for(srv.wait_closed(), timeout=2.0)
            except asyncio.TimeoutError:
                logger.warning("relay listener did not close within 2 s")
