"""The one table of every ``COMMLAYER_*`` knob: name, type, default, scope and meaning.

Library code reads configuration only through :func:`get` (a test fails on any other
``os.environ`` read of a ``COMMLAYER_*`` name in the library). The README's and docs' tables are
generated from :data:`SETTINGS` (``python scripts/gen_settings.py``; ``python -m commlayer.settings
--markdown`` prints the table).

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
        readme: also listed in the README's short table (every row is in docs/settings.md).
    """

    name: str
    type: type
    default: Any
    scope: str
    doc: str
    readme: bool = False

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
        Setting("COMMLAYER_PORT", int, 0, "transport", "TCP port this rank listens on (0 = any free port)", readme=True),
        Setting("COMMLAYER_HOST", str, "", "transport", "address this rank listens on (default: the interface routing to MASTER_ADDR)", readme=True),
        Setting("COMMLAYER_IPC", bool, True, "transport", "use ipc:// (and shared memory) for peers on the same machine"),
        Setting("COMMLAYER_IPC_DIR", str, "/tmp", "transport", "directory of the ipc:// socket files"),
        Setting("COMMLAYER_TIMEOUT", float, 1800.0, "transport", "default seconds for any wait when no process-group timeout is given (`World.from_env`: 300 when unset)"),
        Setting("COMMLAYER_HEARTBEAT", float, 2.0, "transport",
                "seconds between heartbeats to each peer (separate control connection); a silent peer is examined after "
                "its adaptive timeout (heartbeat + RTO-style margin) and failed only if its host stopped acknowledging too",
                readme=True),
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
        Setting("COMMLAYER_CONNECT_OVERRIDES", str, "", "transport", "JSON {peer rank: endpoint} dialled instead of the peer's own (the WAN emulator's relays)"),
        Setting("COMMLAYER_SECRET", str, "", "transport", "job secret (>= 16 characters, same on every rank): CurveZMQ encryption + authentication of every peer, "
                "and the key of fleet store records", readme=True),
        Setting("COMMLAYER_SECRET_FILE", str, "", "transport", "file holding the job secret (instead of COMMLAYER_SECRET)"),
        Setting("COMMLAYER_CURVE_SECRET_FILE", str, "", "transport", "this rank's CurveZMQ certificate (zmq.auth.create_certificates) instead of a job secret"),
        Setting("COMMLAYER_CURVE_PUBLIC_DIR", str, "", "transport", "directory of the allowed public certificates (with COMMLAYER_CURVE_SECRET_FILE)"),
        Setting("COMMLAYER_MAILBOX_PEER_BYTES", int, 2 << 30, "transport", "bound on bytes one peer may have buffered for operations not started yet"),
        Setting("COMMLAYER_MAILBOX_MESSAGE_BYTES", int, 2 << 30, "transport", "bound on the bytes of one message buffered before its operation starts"),
        Setting("COMMLAYER_ENCRYPT", str, "auto", "transport", "encryption: auto (on off loopback: CurveZMQ on a rank listening on a non-loopback address, "
                "sealed fleet store records for a store off loopback, which then needs COMMLAYER_SECRET), on, off"),
        Setting("COMMLAYER_DEBUG", str, "off", "transport", "off, or detail: also compare every call's tensor shapes across ranks (TORCH_DISTRIBUTED_DEBUG=DETAIL does the same)"),
        # per group
        Setting("COMMLAYER_ALGO", str, "auto", "group", "all_reduce algorithm: `auto` (measured links + cost model on a default group "
                "of 3+ ranks whose peers are reached over the network; size rule otherwise) or a name of commlayer.topologies.registry: `ring`, `tree`, `chain`, `ps`", readme=True),
        Setting("COMMLAYER_CODEC", str, "", "group", "codec spec for float all_reduce SUM/AVG, e.g. `topk:ratio=0.01+ef` (empty = exact); "
                "`auto` = the controller picks per bucket from the measured links and compute (commlayer.adapt.autocodec)", readme=True),
        Setting("COMMLAYER_CODEC_MIN_BYTES", int, 64 * 1024, "group", "tensors below this size stay exact", readme=True),
        Setting("COMMLAYER_CHUNK_BYTES", int, 1 << 20, "group", "ring pipeline chunk in bytes", readme=True),
        Setting("COMMLAYER_RING_ORDER", str, "", "group", "ring order, comma-separated group ranks (empty = identity)", readme=True),
        Setting("COMMLAYER_PS_SERVERS", int, 1, "group", "parameter-server shards of `COMMLAYER_ALGO=ps` (at most the group size)"),
        Setting("COMMLAYER_SMALL_BYTES", int, 64 * 1024, "group", "`auto`: tree below this many bytes, ring above"),
        Setting("COMMLAYER_SHM_ALLREDUCE", bool, True, "group", "all_reduce through one shared-memory region when every rank of the group is on this machine (algo auto)"),
        Setting("COMMLAYER_SHM_AREA_BYTES", int, 4 << 20, "group", "bytes per rank and round of the shared-memory all_reduce (two areas per rank)"),
        Setting("COMMLAYER_SHM_SMALL_BYTES", int, 512 << 10, "group", "up to this many bytes x ranks every rank reduces the whole tensor (one barrier)"),
        Setting("COMMLAYER_SHM_SPIN", int, -1, "group", "flag scans before a shared-memory wait sleeps (-1: 20 when ranks <= cores, else 0)"),
        # fleets (commlayer.fleet)
        Setting("COMMLAYER_FLEET_STORE", str, "", "fleet", "host:port of the fleet's c10d TCPStore (membership, round ledger)", readme=True),
        Setting("COMMLAYER_FLEET_RELAY", str, "", "fleet", "host:port of a fleet relay's backend this peer dials out to (peers behind NAT)"),
        # codec memory and delayed sync
        Setting("COMMLAYER_EF_DTYPE", str, "auto", "codec", "storage dtype of error-feedback residuals: auto (float32; float64 for float64 "
                "gradients), fp32, bf16, fp16 (half the memory; g + e is still computed in float32)"),
        Setting("COMMLAYER_CODEC_MEMORY_COPIES", float, 1.0, "codec", "most codec state (error-feedback residuals, PowerSGD/DGC "
                "state) per rank, in copies of the gradients it compresses; more raises CodecMemoryError"),
        Setting("COMMLAYER_SYNC_SAFETY", float, 1.5, "codec", "streaming DiLoCo `period=\"auto\"`: headroom factor, "
                "H = fragments x ceil(safety x all-reduce time / inner step time)"),
        Setting("COMMLAYER_SYNC_PERIOD_MAX", int, 512, "codec", "streaming DiLoCo `period=\"auto\"`: largest period H"),
        # adaptation
        Setting("COMMLAYER_ADAPT", str, "auto", "adapt", "link probing + planner: auto = when some peer is remote, 1 = always, 0 = never", readme=True),
        Setting("COMMLAYER_METRICS", str, "", "adapt", "JSON-lines file for the controller's measurements and decisions "
                "(`{rank}` = the rank; `COMMLAYER_CODEC=auto` writes `auto_plan` and `auto_step` events: choice per bucket and why, "
                "bytes per step, compute utilization)", readme=True),
        Setting("COMMLAYER_ADAPT_POLICY", str, "auto", "adapt", "`COMMLAYER_CODEC=auto` policy: `auto` (least error within 10 % of the "
                "fastest step), `hide` (least error that the overlappable compute hides), `error_budget` (fastest within the budget), "
                "`exact`", readme=True),
        Setting("COMMLAYER_ERROR_BUDGET", float, 0.9, "adapt", "`COMMLAYER_CODEC=auto`: largest one-step relative error "
                "||C(g) - g|| / ||g|| of an admitted codec, measured on the real bucket (error feedback re-sends the rest later)", readme=True),
        Setting("COMMLAYER_COMPUTE_S", float, 0.0, "adapt", "`COMMLAYER_CODEC=auto`: overlappable compute per bucket in seconds "
                "(0 = measured between bucket arrivals)"),
        Setting("COMMLAYER_AUTO_CODECS", str, "", "adapt", "`COMMLAYER_CODEC=auto`: ';'-separated candidate codec specs "
                "(empty = fp16, int8+ef, powersgd ranks 32/8/2 +ef, topk 1 % / 0.1 % +ef)"),
        # tools (CLI, demo, emulator, tests)
        Setting("COMMLAYER_LOG", str, "WARNING", "tools", "log level of the demo's ranks"),
        Setting("COMMLAYER_WAN_LINKS", str, "", "tools", "set by the WAN emulator for each rank: the emulated link matrix's name (informational)"),
        Setting("COMMLAYER_REGEN_GOLDEN", bool, False, "tools", "tests: rewrite tests/golden/*.bin instead of comparing with them"),
    )
}

#: Variables the library reads that are not commlayer's own (torchrun's contract), and who reads them.
EXTERNAL: dict[str, str] = {
    "MASTER_ADDR": "transport/endpoints.py (route towards it), adapt/session.py, topologies/world.py",
    "MASTER_PORT": "transport/endpoints.py, adapt/session.py, topologies/world.py",
    "RANK": "topologies/world.py (World.from_env)",
    "WORLD_SIZE": "topologies/world.py (World.from_env)",
    "LIVENESS_DEBUG": "commlayer/testing/liveness.py (liveness runs log their ranks at INFO and print their stderr)",
    "TMPDIR": "commlayer/testing/launch.py (where ranks dump their stacks for hang reports)",
    "TORCHELASTIC_RESTART_COUNT": "transport/bootstrap.py (endpoint records scoped to the elastic attempt)",
    "TORCH_DISTRIBUTED_DEBUG": "transport/config.py (DETAIL turns on the cross-rank shape check, like COMMLAYER_DEBUG=detail)",
    "TORCH_DEVICE_BACKEND_AUTOLOAD": "_autoload.py (unless 1, torch skips the entry point, so import commlayer registers zmq itself)",
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


def _show(default: Any) -> str:
    if default in ("", None):
        return "unset"
    if isinstance(default, bool):
        return "`1`" if default else "`0`"
    if isinstance(default, int) and default >= 1024 and default & (default - 1) == 0:
        shift, unit = next((i, u) for i, u in ((30, "GiB"), (20, "MiB"), (10, "KiB")) if default >= 1 << i)
        return f"`{default}` ({default >> shift} {unit})"
    return f"`{default}`"


def markdown(scope: str | None = None, readme: bool = False) -> str:
    """The settings table as Markdown (the README/docs tables are generated from this).

    Args:
        scope: only the rows of this scope.
        readme: only the rows marked for the README.
    """
    rows = ["| variable | default | scope | meaning |", "|---|---|---|---|"]
    for s in SETTINGS.values():
        if (scope is None or s.scope == scope) and (s.readme or not readme):
            rows.append(f"| `{s.name}` | {_show(s.default)} | {s.scope} | {s.doc} |")
    return "\n".join(rows)


def document() -> str:
    """The whole of docs/settings.md, generated from :data:`SETTINGS` and :data:`EXTERNAL`."""
    ext = "\n".join(f"| `{name}` | {who} |" for name, who in EXTERNAL.items())
    return f"""# Settings

Generated by `python scripts/gen_settings.py` from `commlayer/settings.py`; a test
(`tests/test_settings.py`) fails when this file or the README's table differs from the table
there, and when library code reads a `COMMLAYER_*` variable any other way than
`commlayer.settings.get(name)`. `get` parses the raw string (booleans: `1/true/yes/on` or
`0/false/no/off`) and raises `ValueError` naming the variable on a bad value; an unset or empty
variable means the default. Transport settings are read once per transport, group settings once
per process group (`pg_options` / `ZmqOptions` override them per group).

{markdown()}

Variables of torchrun's contract the library also reads:

| variable | read by |
|---|---|
{ext}
"""


if __name__ == "__main__":  # pragma: no cover - a documentation helper
    args = sys.argv[1:]
    if args[:1] == ["--doc"]:
        print(document(), end="")
    elif args[:1] == ["--readme"]:
        print(markdown(readme=True))
    elif args[:1] in (["--markdown"], []):
        print(markdown(args[1] if len(args) > 1 else None))
    else:
        raise SystemExit(f"usage: python -m commlayer.settings [--markdown [SCOPE] | --readme | --doc]; got {args}")
