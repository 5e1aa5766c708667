"""A shared-memory region for the ranks of one group on one machine: flag words and byte areas.

One segment in ``/dev/shm`` holds a control page (one 32-bit flag word per rank, each on its own
cache line, whose rest holds two slots of three tag words the caller fills, e.g. a fingerprint) and, per rank, two byte areas of ``area_bytes`` (inputs) and two of ``result_bytes``
(reduced slices). The creator unlinks the file as soon as every rank has mapped it, so the
kernel frees the memory when the last rank unmaps it or dies, whatever way it exits. The name
carries the creator's pid, so a segment left by a creator killed before that point is removed
by the next :func:`create` on this machine (``remove_stale``).

Barriers: a rank arrives by storing the barrier's number into its flag word (x86-64 stores are
seen in program order, so data written before the flag is visible to whoever sees the flag). A
rank that then finds every flag set is the last one: it stores the number into the shared
release word and wakes the sleepers with one FUTEX_WAKE. The others spin briefly, then sleep on
the release word in slices of ~20 ms; after each slice they re-scan the flags themselves (so a
missed wake-up costs one slice, never a hang) and call a liveness check. Each waiter wakes once
per barrier and only the last arriver makes a system call.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import platform
import sys
import time
from typing import Callable

import numpy as np
import torch

from commlayer.transport.endpoints import remove_stale

logger = logging.getLogger(__name__)

DIR = "/dev/shm"
LINE = 64  # bytes between two ranks' flag words (one cache line each)
ALIGN = 4096
_MASK = 0x7FFFFFFF
_SLICE = 0.02  # seconds a waiter sleeps before checking liveness and the deadline again


def region_path(pid: int, nonce: str, channel: str) -> str:
    """The segment's name: the creator's pid (stale-file cleanup), its nonce (the job) and the group's channel."""
    safe = "".join(c if c.isalnum() else "_" for c in channel)[:64]
    return os.path.join(DIR, f"commlayer-{pid}-{nonce}-ar-{safe}.shm")


def supported() -> str:
    """"" when shared-memory regions work here, else why not (for the log)."""
    if not sys.platform.startswith("linux"):
        return f"needs Linux, this is {sys.platform}"
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"needs x86-64's store ordering, this is {platform.machine()}"
    if not (os.path.isdir(DIR) and os.access(DIR, os.W_OK)):
        return f"{DIR} is not writable"
    return ""


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


class _Futex:
    """FUTEX_WAIT / FUTEX_WAKE on 32-bit words of a shared mapping (no-op without libc's syscall)."""

    _SYS_FUTEX = 202  # x86-64
    _WAIT, _WAKE = 0, 1

    class _Timespec(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

    def __init__(self) -> None:
        try:
            self._syscall = ctypes.CDLL(None, use_errno=True).syscall
            self._syscall.restype = ctypes.c_long
            self.ok = True
        except (OSError, AttributeError):  # pragma: no cover - no libc
            self._syscall, self.ok = None, False  # type: ignore[assignment]

    def wait(self, addr: int, expected: int, seconds: float) -> None:
        """Sleeps while the word at ``addr`` equals ``expected``, at most ``seconds`` (spurious wake-ups are fine)."""
        if not self.ok:
            time.sleep(min(seconds, 0.0002))
            return
        ts = self._Timespec(int(seconds), int((seconds % 1) * 1e9))
        self._syscall(self._SYS_FUTEX, ctypes.c_void_p(addr), self._WAIT, ctypes.c_int(expected), ctypes.byref(ts), None, 0)

    def wake(self, addr: int) -> None:
        if self.ok:
            self._syscall(self._SYS_FUTEX, ctypes.c_void_p(addr), self._WAKE, ctypes.c_int(_MASK), None, None, 0)


_futex = _Futex()


class Region:
    """A mapped group segment. Create with :func:`create` (one rank) or :func:`attach` (the others).

    Args:
        mm: the mapping.
        path: its file name (already unlinked once every rank has attached).
        nranks: ranks sharing it.
        area_bytes: bytes of each rank's input area (two per rank).
        result_bytes: bytes of each rank's result area (two per rank).
        rank: this rank's index (its flag word).
    """

    def __init__(self, mm: mmap.mmap, path: str, nranks: int, area_bytes: int, result_bytes: int, rank: int) -> None:
        self.mm, self.path, self.nranks, self.rank = mm, path, nranks, rank
        self.area_bytes, self.result_bytes = area_bytes, result_bytes
        raw = np.frombuffer(mm, dtype=np.uint8)
        self._bytes = torch.from_numpy(raw)  # every view below derives from this one export
        words = np.frombuffer(mm, dtype=np.int32, count=(nranks + 1) * LINE // 4)
        self._flags = words[: nranks * LINE // 4: LINE // 4]
        self._release = words[nranks * LINE // 4:][:1]  # its own cache line after the flags
        self._release_addr = words.ctypes.data + nranks * LINE
        # The rest of each rank's flag line: two slots (by barrier parity) of three tag words.
        self._tagv = np.frombuffer(mm, dtype=np.int64, count=nranks * LINE // 8).reshape(nranks, LINE // 8)
        self.interrupts = 0  # bumped by interrupt(): waiters check liveness at once
        ctl = _round_up((nranks + 1) * LINE, ALIGN)
        per = 2 * area_bytes + 2 * result_bytes
        self._in = [[ctl + q * per + b * area_bytes for q in range(nranks)] for b in (0, 1)]
        self._res = [[ctl + q * per + 2 * area_bytes + b * result_bytes for q in range(nranks)] for b in (0, 1)]
        self._views: dict[tuple[int, int, torch.dtype], list[torch.Tensor]] = {}
        self.gen = int(self._flags[rank])  # barriers this rank has passed (a fresh segment is all zeros)

    @staticmethod
    def nbytes(nranks: int, area_bytes: int, result_bytes: int) -> int:
        return _round_up((nranks + 1) * LINE, ALIGN) + nranks * (2 * area_bytes + 2 * result_bytes)

    # ---- data views -------------------------------------------------------------------------
    def _typed(self, kind: int, buf: int, dtype: torch.dtype) -> list[torch.Tensor]:
        key = (kind, buf, dtype)
        views = self._views.get(key)
        if views is None:
            offsets, size = (self._in, self.area_bytes) if kind == 0 else (self._res, self.result_bytes)
            views = self._views[key] = [self._bytes[o:o + size].view(dtype) for o in offsets[buf]]
        return views

    def inputs(self, buf: int, dtype: torch.dtype, lo: int, hi: int) -> list[torch.Tensor]:
        """Every rank's input area ``buf`` (0/1) as elements ``[lo, hi)`` of ``dtype``."""
        return [v[lo:hi] for v in self._typed(0, buf, dtype)]

    def results(self, buf: int, dtype: torch.dtype, counts: list[int]) -> list[torch.Tensor]:
        """Every rank's result area ``buf``, rank ``q``'s as ``counts[q]`` elements of ``dtype``."""
        return [v[:n] for v, n in zip(self._typed(1, buf, dtype), counts)]

    def set_tag(self, buf: int, words: tuple[int, int, int]) -> None:
        """Stores three words in this rank's tag slot ``buf`` (0/1), visible with its next arrival.

        Readers read slot ``g % 2`` after barrier ``g``; a rank writes that slot again only for barrier
        ``g + 2``, which nobody passes before every rank has arrived at ``g + 1``, so reads never race writes.
        """
        self._tagv[self.rank, 1 + 3 * buf:4 + 3 * buf] = words

    def tags(self, buf: int) -> list[list[int]]:
        """Every rank's tag slot ``buf`` (valid for the barrier with that parity this rank just passed)."""
        return self._tagv[:, 1 + 3 * buf:4 + 3 * buf].tolist()  # type: ignore[no-any-return]

    # ---- synchronisation --------------------------------------------------------------------
    def arrive(self) -> int:
        """Publishes that this rank reached the next barrier; returns its number."""
        self.gen += 1
        self._flags[self.rank] = self.gen & _MASK
        return self.gen

    @staticmethod
    def _first_missing(flags: np.ndarray, want: int) -> int:
        for q, v in enumerate(flags.tolist()):
            if (v - want) & _MASK >= 0x40000000:  # v < want, modulo wrap-around
                return q
        return -1

    def wait_all(self, gen: int, deadline: float, spin: int, check: Callable[[int, float], None]) -> None:
        """Returns once every rank has arrived at barrier ``gen``.

        Args:
            deadline: ``time.monotonic()`` after which ``check`` is told the wait timed out.
            spin: scans before a waiter starts sleeping.
            check: ``check(rank, now)`` raises if ``rank`` (one not arrived yet) is dead, failed, or
                the deadline passed; called between sleeping slices (every ~20 ms).
        """
        want = gen & _MASK
        release, flags = self._release, self._flags  # kept alive here even if close() runs meanwhile
        n = 0
        last_check = 0.0
        seen = self.interrupts
        while True:
            v = int(release[0])
            if (v - want) & _MASK < 0x40000000:
                return
            missing = self._first_missing(flags, want)
            if missing < 0:  # the last to arrive releases everyone
                release[0] = want
                _futex.wake(self._release_addr)
                return
            n += 1
            if n <= spin:
                continue
            now = time.monotonic()
            if self.interrupts != seen:  # a peer failed: check every rank not arrived yet, now
                for q, fv in enumerate(flags.tolist()):
                    if (fv - want) & _MASK >= 0x40000000:
                        check(q, now)
                last_check, seen = now, self.interrupts
            elif now - last_check >= _SLICE:
                if last_check:
                    check(missing, now)
                last_check = now
            _futex.wait(self._release_addr, v, min(_SLICE, max(0.0, deadline - now) + 0.001))

    def interrupt(self) -> None:
        """Wakes this process's waiters now, so that they check liveness at once (a peer just failed)."""
        self.interrupts += 1
        if self._flags is not None:  # still mapped
            _futex.wake(self._release_addr)

    def close(self) -> None:
        """Unmaps the segment (later, when the last view dies, if views are still alive)."""
        self._bytes = self._flags = self._tagv = self._release = None  # type: ignore[assignment]
        self._views.clear()
        try:
            self.mm.close()
        except BufferError:
            logger.debug("shared-memory region %s still viewed; unmapped when the views die", self.path)


def create(path: str, nranks: int, area_bytes: int, result_bytes: int) -> Region:
    """Creates, reserves (``posix_fallocate``: a full ``/dev/shm`` fails here, not with SIGBUS later) and maps a segment."""
    remove_stale(DIR, ".shm")
    total = Region.nbytes(nranks, area_bytes, result_bytes)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, total)
        mm = mmap.mmap(fd, total)
    except BaseException:
        os.close(fd)
        unlink(path)
        raise
    os.close(fd)
    return Region(mm, path, nranks, area_bytes, result_bytes, 0)


def attach(path: str, nranks: int, area_bytes: int, result_bytes: int, rank: int) -> Region:
    """Maps a segment made by :func:`create` after checking its size."""
    total = Region.nbytes(nranks, area_bytes, result_bytes)
    fd = os.open(path, os.O_RDWR)
    try:
        got = os.fstat(fd).st_size
        if got != total:
            raise ValueError(f"shared-memory region {path}: expected {total} bytes, got {got}")
        mm = mmap.mmap(fd, total)
    finally:
        os.close(fd)
    return Region(mm, path, nranks, area_bytes, result_bytes, rank)


def unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def pid_alive(pid: int) -> bool:
    """False when process ``pid`` is gone or a zombie (killed but not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    state = stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3]
    return state not in (b"Z", b"X")
