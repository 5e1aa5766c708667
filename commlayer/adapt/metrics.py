"""Exported measurements and decisions: JSON lines (one object per event) and Prometheus text.

Events: ``plan`` (a decision and its runners-up), ``replan`` (why, new link matrix), ``collective``
(bytes, seconds, predicted, achieved bandwidth, codec ratio/error), ``codec_profile``, ``links``.
Every line has ``ts`` (unix seconds), ``rank`` and ``event``. ``commlayer probe --json`` prints the
same ``links`` objects.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from typing import Any, Iterable, TextIO

logger = logging.getLogger(__name__)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


class MetricsSink:
    """Appends events to a JSON-lines file (``path`` "" = keep only the last 1000 in memory).

    ``{rank}`` in ``path`` is replaced by the rank, so ranks may write separate files.
    """

    def __init__(self, path: str = "", rank: int = 0, keep: int = 1000) -> None:
        self.rank = rank
        self.path = path.replace("{rank}", str(rank)) if path else ""
        self.events: list[dict[str, Any]] = []
        self._keep = keep
        self._lock = threading.Lock()
        self._file: TextIO | None = None
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        rec = _clean({"ts": time.time(), "rank": self.rank, "event": event, **fields})
        with self._lock:
            self.events.append(rec)
            if len(self.events) > self._keep:
                del self.events[: len(self.events) - self._keep]
            if self._file is not None:
                self._file.write(json.dumps(rec, separators=(",", ":")) + "\n")
                self._file.flush()
        return rec

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Events of a JSON-lines file (blank and truncated trailing lines skipped)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s: skipping a malformed line", path)
    return out


def prometheus_text(links: Iterable[dict[str, Any]], counters: Iterable[dict[str, Any]] = (), rank: int = 0) -> str:
    """Prometheus exposition text of link estimates (``as_dict`` of LinkEstimate) and link counters."""
    lines = ["# HELP commlayer_link_latency_seconds one-way latency estimate of a directed link",
             "# TYPE commlayer_link_latency_seconds gauge",
             "# HELP commlayer_link_bandwidth_bytes estimated bandwidth of a directed link (bytes/s)",
             "# TYPE commlayer_link_bandwidth_bytes gauge"]
    for e in links:
        lab = f'{{rank="{rank}",src="{e["src"]}",dst="{e["dst"]}"}}'
        if e.get("latency_ms") is not None and math.isfinite(e["latency_ms"]):
            lines.append(f"commlayer_link_latency_seconds{lab} {e['latency_ms'] / 1e3:.6g}")
        if e.get("bandwidth_mbit") is not None and math.isfinite(e["bandwidth_mbit"]):
            lines.append(f"commlayer_link_bandwidth_bytes{lab} {e['bandwidth_mbit'] / 8e-6:.6g}")
    lines += ["# TYPE commlayer_link_bytes_sent_total counter", "# TYPE commlayer_link_bytes_received_total counter"]
    for c in counters:
        lab = f'{{rank="{rank}",src="{c["src"]}",dst="{c["dst"]}"}}'
        lines.append(f"commlayer_link_bytes_sent_total{lab} {c['bytes_sent']}")
        lines.append(f"commlayer_link_bytes_received_total{lab} {c['bytes_recv']}")
    return "\n".join(lines) + "\n"
