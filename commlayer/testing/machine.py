"""What every benchmark prints beside its figures: this machine's cores, load and memcpy bandwidth.

Machines differ from session to session (memcpy 0.3-19 GB/s seen on the same VM type), so no figure
is read without them.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np


def memcpy_gbps(nbytes: int = 64 << 20, reps: int = 5) -> float:
    """Median bandwidth of one ``nbytes`` copy (bytes copied per second, in GB/s)."""
    a = np.ones(nbytes, dtype=np.uint8)
    b = np.empty_like(a)
    np.copyto(b, a)  # fault the pages in first
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def machine_line() -> str:
    """``"<cores> cores, load <1-min load>, memcpy <GB/s> GB/s"``."""
    return f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, memcpy {memcpy_gbps():.1f} GB/s"
