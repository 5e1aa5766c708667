"""Shared helpers of the CLI: argument checks, a plain-text progress bar, sizes."""

from __future__ import annotations

import sys
import time
from typing import IO, Any


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


def check_links(links: str, nproc: int) -> Any:
    """Resolves a profile name or link-matrix file for ``nproc`` ranks, or raises CliError listing the profiles."""
    from commlayer.wan import PROFILES, LinkConfigError, resolve_links

    try:
        return resolve_links(links, nproc)
    except LinkConfigError as exc:
        known = "" if "neither a profile" in str(exc) else f"; known profiles: {', '.join(sorted(PROFILES))}"
        raise CliError(f"--links: {exc}{known} (link-matrix files: docs/wan.md)") from None


def check_nproc(nproc: int) -> int:
    if nproc < 1:
        raise CliError(f"--nproc: expected >= 1, got {nproc}")
    return nproc


def parse_size(text: str) -> int:
    """'4', '64K', '1M', '1.5G' -> bytes (binary units)."""
    s = text.strip().upper().removesuffix("B") or "0"
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        return int(float(s[:-1]) * mult[s[-1]]) if s[-1] in mult else int(s)
    except ValueError:
        raise CliError(f"size {text!r}: expected a number with optional K/M/G suffix, e.g. 64K or 16M") from None


def human(n: float) -> str:
    """Bytes as a short human string (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class Progress:
    """A plain-text progress bar (redrawn in place on a terminal, one line per update otherwise)."""

    def __init__(self, total: int, label: str = "", out: IO[str] | None = None, width: int = 28) -> None:
        self.total = max(1, total)
        self.done = 0
        self.label = label
        self.out = out if out is not None else sys.stderr
        self.width = width
        self.t0 = time.monotonic()
        self.tty = bool(getattr(self.out, "isatty", lambda: False)())

    def update(self, n: int = 1, note: str = "") -> None:
        self.done = min(self.total, self.done + n)
        frac = self.done / self.total
        bar = "#" * int(frac * self.width) + "." * (self.width - int(frac * self.width))
        el = time.monotonic() - self.t0
        eta = el / frac - el if frac > 0 else 0.0
        line = f"{self.label} [{bar}] {self.done}/{self.total} {el:5.0f}s eta {eta:4.0f}s {note}"
        if self.tty:
            self.out.write("\r" + line[:160].ljust(100))
            if self.done >= self.total:
                self.out.write("\n")
        else:
            self.out.write(line + "\n")
        self.out.flush()
