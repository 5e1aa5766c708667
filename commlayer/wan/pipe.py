"""The link model shared by both emulation modes: a rate-limited, delayed FIFO pipe.

Each unit (a packet in namespace mode, a chunk of a TCP stream in relay mode) that arrives at
time ``a`` with ``n`` bytes:

* waits for the link to finish serialising what is ahead of it, then serialises at the rate
  in force: ``finish = max(a, previous finish) + n / rate``;
* propagates for the one-way delay plus a jitter sample: ``release = finish + delay + jitter``;
* is never released before the unit ahead of it (FIFO, no reordering).

So the link carries its full rate once a bandwidth-delay product is in flight (nothing sleeps
per chunk). The bottleneck buffer is bounded (``LinkSpec.queue_s``): in packet mode a unit that
would wait longer than that to start serialising is dropped (drop-tail); in stream mode the
relay stops reading instead (TCP back-pressure).

Loss: in packet mode a unit is dropped with probability ``loss`` (real loss; the kernel's TCP
reacts). In stream mode (relay) TCP hides loss, so the pipe models what TCP would suffer: the
rate is capped by the Mathis et al. bound ``MSS/RTT * sqrt(3/2) / sqrt(p)``, and a chunk of
``k`` segments is "lost" with probability ``1 - (1 - p)**k``; a lost chunk is held back one
extra RTT (fast-retransmit stall), delaying everything behind it (head-of-line blocking) while
serialisation of later bytes continues.
"""

from __future__ import annotations

import math
import random
from typing import Callable

from commlayer.wan.spec import TCP_MSS_BYTES, LinkSpec, tcp_rate_mbit


class LinkPipe:
    """Release-time calculator for one directed link (no I/O; the caller supplies the clock).

    Args:
        spec: the link.
        t0: clock value at which the emulation (and the schedule) started.
        seed: seed of this link's private random generator (jitter, loss).
        stream: True for relay (TCP stream) mode, False for packet mode.
        reverse_delay_ms: for stream mode, ``f(t_s)`` -> one-way delay of the reverse link,
            used for the RTT in the TCP loss model.
    """

    def __init__(self, spec: LinkSpec, t0: float, seed: int, stream: bool,
                 reverse_delay_ms: Callable[[float], float] | None = None) -> None:
        self.spec = spec
        self.t0 = t0
        self.stream = stream
        self._rng = random.Random(seed)
        self._reverse = reverse_delay_ms or (lambda _t: spec.delay_ms)
        self._free = t0  # time the serialiser becomes idle
        self._last_release = t0
        self.units = 0
        self.bytes = 0
        self.dropped_units = 0
        self.dropped_bytes = 0
        self.stalls = 0

    @property
    def last_release(self) -> float:
        """Release time of the last admitted unit (markers queued behind data use it)."""
        return self._last_release

    def rate_bytes_per_s(self, now: float) -> float:
        """Effective rate (bytes/s) at ``now``, including the TCP loss cap in stream mode."""
        p = self.spec.at(now - self.t0)
        if self.stream and p.loss > 0:
            return tcp_rate_mbit(p, p.delay_ms + self._reverse(now - self.t0)) * 1e6 / 8.0
        return p.rate_bytes_per_s

    def backlog_s(self, now: float) -> float:
        """Seconds of data waiting to be serialised at ``now``."""
        return max(0.0, self._free - now)

    def queue_s(self, now: float) -> float:
        """Bottleneck buffer size in seconds at ``now``."""
        return self.spec.queue_s(self.spec.at(now - self.t0))

    def chunk_bytes(self, now: float) -> int:
        """Stream-mode unit size: ~2 ms of data at the current rate, within [MSS, 64 KiB]."""
        r = self.rate_bytes_per_s(now)
        return int(min(65536, max(TCP_MSS_BYTES, 0.002 * r)))

    def admit(self, nbytes: int, now: float) -> float | None:
        """Accepts a unit of ``nbytes`` arriving at ``now``; returns its release time.

        Returns:
            The release time, or None if the unit is dropped (packet mode only).
        """
        t = now - self.t0
        p = self.spec.at(t)
        if not self.stream:
            if self.backlog_s(now) > self.spec.queue_s(p) or (p.loss > 0 and self._rng.random() < p.loss):
                self.dropped_units += 1
                self.dropped_bytes += nbytes
                return None
        rate = self.rate_bytes_per_s(now)
        finish = (max(now, self._free) + nbytes / rate) if math.isfinite(rate) else now
        self._free = finish
        delay = p.delay_ms / 1000.0
        if p.jitter_ms > 0:
            delay = max(0.0, delay + self._rng.gauss(0.0, p.jitter_ms / 1000.0))
        release = finish + delay
        if self.stream and p.loss > 0:
            segments = max(1, math.ceil(nbytes / TCP_MSS_BYTES))
            if self._rng.random() < 1.0 - (1.0 - p.loss) ** segments:
                self.stalls += 1
                release += (p.delay_ms + self._reverse(t)) / 1000.0
        release = max(release, self._last_release)
        self._last_release = release
        self.units += 1
        self.bytes += nbytes
        return release
