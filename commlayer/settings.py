"""The one table of every ``COMMLAYER_*`` knob: name, type, default, scope and meaning.

Library code reads configuration only through :func:`get` (a test fails on any other
``os.environ`` read of a ``COMMLAYER_*`` name in the library). The README's and docs' tables are
generated from :data:`SETTINGS` (``python -m commlayer.settings --markdown``).

Add a knob by adding one :class:`Setting` row below; never read the environment elsewhere.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping

_FALSE = ("0", "false", "no", "off")
_TRUE = ("1", "true", "yes", "on")


def _bool(raw: str) -> bool:
    low = raw.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"expected one of {_TRUE + _FALSE}, got {raw!r}")


def _str(raw: str) -> str:
    return raw


_PARSERS: dict[type, Callable[[str], Any]] = {int: int, float: float, bool: _bool, str: _str}


@dataclass(frozen=True)
class Setting:
    """One knob.

    Attributes:
        name: the environment variable, ``COMMLAYER_...``.
        type: int, float, bool or str (parsing of the raw string).
        default: value when the variable is unset or empty.
        scope: who reads it: "transport", "group" (per process group, also ``pg_options``),
            "adapt", "codec", "tools" (CLI, demo, emulator).
        doc: one line for the generated tables.
    """

    name: str
    type: type
    default: Any
    scope: str
    doc: str

    def parse(self, raw: str) -> Any:
        try:
            return _PARSERS[self.type](raw)
        except ValueError:
            kind = {int: "an integer", float: "a number", bool: "a boolean", str: "a string"}[self.type]
            raise ValueError(f"{self.name}: expected {kind}, got {raw!r}") from None


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        # transport
        Setting("COMMLAYER_PORT", int, 0, "transport", "TCP port this rank listens on (0 = any free port)"),
        Setting("COMMLAYER_HOST", str, "", "transport", "address this rank listens on (default: the interface routing to MASTER_ADDR)"),
        Setting("COMMLAYER_IPC", bool, True, "transport", "use ipc:// (and shared memory) for peers on the same machine"),
        Setting("COMMLAYER_TIMEOUT", float, 1800.0, "transport", "default seconds for any wait when no process-group timeout is given"),
        Setting("COMMLAYER_HEARTBEAT", float, 2.0, "transport",
                "seconds between heartbeats to each peer (separate control connection); least silence examined"),
        Setting("COMMLAYER_LIVENESS_FLOOR", float, 1.0, "transport",
                "least adaptive silence timeout in seconds (timeout = heartbeat + SRTT + 4 RTTVAR, clamped)"),
        Setting("COMMLAYER_LIVENESS_CEILING", float, 60.0, "transport", "largest adaptive silence timeout in seconds"),
        Setting("COMMLAYER_SEND_QUEUE_BYTES", int, 16 << 20, "transport",
                "most payload bytes queued in ZeroMQ towards one peer before a send waits (0 = unbounded)"),
        Setting("COMMLAYER_LINGER", float, 2.0, "transport", "seconds to flush outgoing messages at shutdown"),
        Setting("COMMLAYER_MAILBOX_BYTES", int, 4 << 30, "transport", "bound on bytes buffered for operations not started yet"),
        Setting("COMMLAYER_MAILBOX_MESSAGES", int, 1 << 20, "transport", "bound on messages buffered for operations not started yet"),
        Setting("COMMLAYER_SOCKBUF", int, 0, "transport", "kernel socket buffer size in bytes (0 = OS default)"),
        Setting("COMMLAYER_SHM", bool, True, "transport", "shared-memory rings for co-located peers"),
        Setting("COMMLAYER_SHM_BYTES", int, 32 << 20, "transport", "size of each shared-memory ring"),
        # per group
        Setting("COMMLAYER_ALGO", str, "auto", "group", "all_reduce algorithm: auto, ring, tree, ps"),
        Setting("COMMLAYER_CODEC", str, "", "group", "codec spec for float all_reduce SUM/AVG (empty = exact)"),
        Setting("COMMLAYER_CODEC_MIN_BYTES", int, 64 * 1024, "group", "tensors below this size stay exact"),
        Setting("COMMLAYER_CHUNK_BYTES", int, 1 << 20, "group", "ring pipeline chunk in bytes"),
        Setting("COMMLAYER_RING_ORDER", str, "", "group", "ring order, comma-separated group ranks (empty = identity)"),
    )
}


def get(name: str, environ: Mapping[str, str] | None = None) -> Any:
    """Return the parsed value of the knob ``name`` (its default when unset or empty).

    Args:
        name: a ``COMMLAYER_*`` name from :data:`SETTINGS`.
        environ: mapping to read instead of ``os.environ`` (tests, per-group overrides).

    Raises:
        KeyError: ``name`` is not in the table (the message lists the known names).
        ValueError: the raw value does not parse ("Expected X, got Y").
    """
    try:
        setting = SETTINGS[name]
    except KeyError:
        raise KeyError(f"unknown setting {name!r}; known: {sorted(SETTINGS)}") from None
    raw = (os.environ if environ is None else environ).get(name)
    if raw is None or raw == "":
        return setting.default
    return setting.parse(raw)


def is_set(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """True when ``name`` (a known knob) has a non-empty value in the environment."""
    if name not in SETTINGS:
        raise KeyError(f"unknown setting {name!r}; known: {sorted(SETTINGS)}")
    return bool((os.environ if environ is None else environ).get(name))


def markdown(scope: str | None = None) -> str:
    """The settings table as Markdown (the README/docs tables are generated from this)."""
    rows = ["| variable | default | scope | meaning |", "|---|---|---|---|"]
    for s in SETTINGS.values():
        if scope is None or s.scope == scope:
            default = "unset" if s.default in ("", None) else f"`{s.default}`"
            rows.append(f"| `{s.name}` | {default} | {s.scope} | {s.doc} |")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover - a documentation helper
    print(markdown(sys.argv[2] if len(sys.argv) > 2 else None))
