"""Mode B packet forwarder: moves IPv4 packets between per-rank TUN devices through LinkPipes.

Runs as its own process (``python -m commlayer.wan._child tunfwd FD``), in the root namespace. It
opens one TUN device per rank (the parent then moves each into the rank's namespace), reads
every IPv4 packet a rank sends, looks up the destination rank by address, queues the packet on
link src->dst (rate, delay, jitter, real random loss, drop-tail buffer) and writes it to the
destination's TUN device at its release time. Non-IPv4 packets and unknown destinations are
dropped.
"""

from __future__ import annotations

import fcntl
import heapq
import logging
import os
import select
import socket
import struct
import time
from multiprocessing.connection import Connection

from commlayer.wan.matrix import LinkMatrix
from commlayer.wan.pipe import LinkPipe

logger = logging.getLogger(__name__)

_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_EARLY_S = 0.0001  # release at most this early (covers wake-up latency)
_BURST = 64


def open_tun(name: str) -> int:
    """Creates (non-persistent) TUN device ``name``; returns its non-blocking fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def forward(links: LinkMatrix, names: list[str], addrs: list[str], t0: float, seed: int, conn: Connection) -> None:
    """Opens the TUN devices, reports ready, and forwards until told to stop.

    Args:
        links: the link matrix.
        names: TUN device name per rank (in the root namespace, before the move).
        addrs: IPv4 address per rank.
        t0: ``time.monotonic()`` origin of the schedules.
        seed: base seed for jitter/loss generators.
        conn: control connection to the parent ("stats" / "stop").
    """
    fds: list[int] = []
    try:
        for name in names:
            fds.append(open_tun(name))
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        conn.send(("error", f"cannot open TUN device: {exc}"))
        return
    rank_of = {socket.inet_aton(a): i for i, a in enumerate(addrs)}
    pipes = {(i, j): LinkPipe(s, t0, seed * 1_000_003 + i * 1009 + j, stream=False) for i, j, s in links.pairs()}
    heap: list[tuple[float, int, int, bytes]] = []
    seq = 0
    ep = select.epoll()
    fd_rank = {fd: i for i, fd in enumerate(fds)}
    for fd in fds:
        ep.register(fd, select.EPOLLIN)
    ep.register(conn.fileno(), select.EPOLLIN)
    conn.send(("ready", None))
    write_errors = 0
    try:
        while True:
            timeout = max(0.0, heap[0][0] - _EARLY_S - time.monotonic()) if heap else 1.0
            # epoll_wait has ms resolution; select() on the epoll fd has microseconds.
            if timeout > 0 and ep.fileno() < 1024:
                select.select([ep.fileno()], [], [], timeout)
                timeout = 0
            for fd, _ev in ep.poll(timeout):
                if fd == conn.fileno():
                    try:
                        cmd = conn.recv()
                    except (EOFError, OSError):
                        return
                    if cmd != "stats":
                        return
                    conn.send(("stats", {k: {"bytes": p.bytes, "units": p.units, "dropped_units": p.dropped_units,
                                             "dropped_bytes": p.dropped_bytes} for k, p in pipes.items()}
                               | {"write_errors": write_errors}))
                    continue
                i = fd_rank[fd]
                now = time.monotonic()
                for _ in range(_BURST):
                    try:
                        pkt = os.read(fd, 65536)
                    except BlockingIOError:
                        break
                    if len(pkt) < 20 or pkt[0] >> 4 != 4:
                        continue
                    j = rank_of.get(pkt[16:20])
                    if j is None or j == i:
                        continue
                    release = pipes[(i, j)].admit(len(pkt), now)
                    if release is not None:
                        heapq.heappush(heap, (release, seq, j, pkt))
                        seq += 1
            now = time.monotonic() + _EARLY_S
            while heap and heap[0][0] <= now:
                _, _, j, pkt = heapq.heappop(heap)
                try:
                    os.write(fds[j], pkt)
                except OSError:
                    write_errors += 1
    finally:
        ep.close()
        for fd in fds:
            os.close(fd)

