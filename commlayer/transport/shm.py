"""Shared-memory payloads between ranks on the same machine.

Each sender keeps one single-producer/single-consumer byte ring per co-located peer in
``/dev/shm``. A large payload is copied into the ring once and only a descriptor crosses the
socket; the receiver reads the bytes in place (a zero-copy view) and releases the region when
the last view of it is garbage. Regions are released in any order; the consumer advances the
ring's tail (stored in the segment) over the released prefix. A full ring never blocks: the
sender falls back to the socket.
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from collections import deque
from typing import Any

import numpy as np

HEADER = 64  # bytes: [0:8) tail counter written by the consumer
DIR = "/dev/shm"


def ring_path(pid: int, nonce: str, src: int, dst: int) -> str:
    return os.path.join(DIR, f"commlayer-{pid}-{nonce}-{src}-{dst}.shm")


def available() -> bool:
    return os.path.isdir(DIR) and os.access(DIR, os.W_OK)


class _Segment:
    def __init__(self, path: str, size: int, create: bool) -> None:
        self.path = path
        if create:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                # Reserve the pages now: a full /dev/shm then fails here, not with SIGBUS on a later write.
                os.posix_fallocate(fd, 0, HEADER + size)
                self.mm = mmap.mmap(fd, HEADER + size)
            except OSError:
                os.close(fd)
                os.unlink(path)
                raise
            os.close(fd)
        else:
            fd = os.open(path, os.O_RDWR)
            try:
                total = os.fstat(fd).st_size
                self.mm = mmap.mmap(fd, total)
            finally:
                os.close(fd)
            size = total - HEADER
        self.size = size
        self.tail = np.frombuffer(self.mm, dtype=np.int64, count=1, offset=0)
        self.data = np.frombuffer(self.mm, dtype=np.uint8, count=size, offset=HEADER)

    def release(self) -> None:
        """Unmaps now (and frees mmap's duplicate fd) unless views are still alive; then at their death."""
        self.tail = self.data = None  # type: ignore[assignment]
        try:
            self.mm.close()
        except BufferError:
            pass


class Producer:
    """The sending side of one ring (this rank -> one peer). Callers serialise with the peer's lock."""

    def __init__(self, path: str, size: int) -> None:
        from commlayer.transport.endpoints import remove_stale

        remove_stale(DIR, ".shm")
        self.seg = _Segment(path, size, create=True)
        self.head = 0  # bytes ever reserved (monotonic)

    def put(self, buffers: list[Any]) -> list[int] | None:
        """Copies ``buffers`` into the ring; returns their start counters, or None if it is full."""
        seg = self.seg
        tail = int(seg.tail[0])
        head = self.head
        starts = []
        for b in buffers:
            src = np.frombuffer(b, dtype=np.uint8) if not isinstance(b, np.ndarray) else b.reshape(-1).view(np.uint8)
            n = src.nbytes
            pos = head % seg.size
            if pos + n > seg.size:  # do not split a payload across the end: skip to the start
                head += seg.size - pos
                pos = 0
            if head + n - tail > seg.size:
                return None  # full (nothing reserved: self.head is unchanged)
            seg.data[pos:pos + n] = src
            starts.append(head)
            head += n
        self.head = head
        return starts

    def close(self) -> None:
        try:
            os.unlink(self.seg.path)
        except OSError:
            pass
        self.seg.release()


class Consumer:
    """The receiving side of one ring (one peer -> this rank)."""

    def __init__(self, path: str) -> None:
        self.seg = _Segment(path, 0, create=False)
        self._lock = threading.Lock()
        self._pending: deque[list[int]] = deque()  # [start, end, released] in sending order
        self.closed = False

    def views(self, starts: list[int], sizes: list[int]) -> list[np.ndarray]:
        """Zero-copy views of received payloads; each region is released when its view dies."""
        out = []
        size = self.seg.size
        for start, n in zip(starts, sizes):
            if not (0 <= n <= size) or start < 0:
                raise ValueError(f"shared-memory region ({start}, {n}) outside a ring of {size} bytes")
            pos = start % size
            if pos + n > size:
                raise ValueError(f"shared-memory region ({start}, {n}) crosses the end of the ring")
            entry = [start, start + n, 0]
            with self._lock:
                self._pending.append(entry)
            v = self.seg.data[pos:pos + n].view()
            weakref.finalize(v, self._release, entry)
            out.append(v)
        return out

    def _release(self, entry: list[int]) -> None:
        with self._lock:
            entry[2] = 1
            tail = -1
            while self._pending and self._pending[0][2]:
                tail = self._pending.popleft()[1]
            if tail >= 0 and not self.closed:
                self.seg.tail[0] = tail

    def close(self) -> None:
        """Stops releasing into the ring and unmaps it; removes the file (the producer may be dead)."""
        with self._lock:
            self.closed = True
        try:
            os.unlink(self.seg.path)
        except OSError:
            pass
        self.seg.release()
