"""Transport configuration, from environment variables or explicit values."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from commlayer import settings
from commlayer.transport.liveness import LivenessConfig


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}: expected a number, got {raw!r}") from None


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {raw!r}") from None


@dataclass(frozen=True)
class TransportConfig:
    """Knobs of the ZeroMQ transport.

    Attributes:
        port: TCP port to listen on (0 = any free port). ``COMMLAYER_PORT``.
        ipc: use ``ipc://`` for peers on the same machine. ``COMMLAYER_IPC`` (1/0).
        timeout: default seconds for any wait (the process-group timeout).
        heartbeat: seconds between heartbeats (on a separate control connection per peer).
            ``COMMLAYER_HEARTBEAT``; with ``liveness`` it sets the adaptive silence timeout
            (docs/reliability.md, "Liveness").
        linger: seconds to flush outgoing messages at shutdown. ``COMMLAYER_LINGER``.
        mailbox_bytes: bound on bytes buffered for operations not started yet. ``COMMLAYER_MAILBOX_BYTES``.
        mailbox_messages: bound on such messages. ``COMMLAYER_MAILBOX_MESSAGES``.
        copy_threshold: frames below this many bytes are copied, larger ones sent zero-copy.
        hwm: ZeroMQ high-water mark (messages queued per peer before send blocks).
        sockbuf: kernel socket buffer size in bytes (0 = the OS default). ``COMMLAYER_SOCKBUF``.
        shm_bytes: shared-memory ring per co-located peer (0 = off). ``COMMLAYER_SHM_BYTES``, ``COMMLAYER_SHM=0``.
        shm_min: payloads of at least this many bytes to a co-located peer go through shared memory.
        liveness_floor: least adaptive silence timeout, s. ``COMMLAYER_LIVENESS_FLOOR``.
        liveness_ceiling: largest adaptive silence timeout, s. ``COMMLAYER_LIVENESS_CEILING``.
        send_queue_bytes: most payload bytes queued in ZeroMQ towards one peer before a send
            waits (0 = unbounded). ``COMMLAYER_SEND_QUEUE_BYTES``.
    """

    port: int = 0
    ipc: bool = True
    timeout: float = 1800.0
    heartbeat: float = 2.0
    linger: float = 2.0
    mailbox_bytes: int = 4 << 30
    mailbox_messages: int = 1 << 20
    copy_threshold: int = 64 * 1024
    hwm: int = 100_000
    sockbuf: int = 0
    shm_bytes: int = 32 << 20
    shm_min: int = 64 * 1024
    liveness_floor: float = 1.0
    liveness_ceiling: float = 60.0
    send_queue_bytes: int = 16 << 20
    liveness: LivenessConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"COMMLAYER_PORT: expected 0..65535, got {self.port}")
        for name in ("timeout", "heartbeat"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: expected a positive number of seconds, got {getattr(self, name)}")
        if self.linger < 0:
            raise ValueError(f"linger: expected >= 0 seconds, got {self.linger}")
        if self.send_queue_bytes < 0:
            raise ValueError(f"COMMLAYER_SEND_QUEUE_BYTES: expected >= 0, got {self.send_queue_bytes}")
        object.__setattr__(self, "liveness", LivenessConfig(self.heartbeat, self.liveness_floor, self.liveness_ceiling))

    @classmethod
    def from_env(cls, timeout: float | None = None) -> "TransportConfig":
        return cls(
            port=_env_int("COMMLAYER_PORT", 0),
            ipc=os.environ.get("COMMLAYER_IPC", "1") not in ("0", "false", "no"),
            timeout=timeout if timeout is not None else _env_float("COMMLAYER_TIMEOUT", 1800.0),
            heartbeat=_env_float("COMMLAYER_HEARTBEAT", 2.0),
            linger=_env_float("COMMLAYER_LINGER", 2.0),
            mailbox_bytes=_env_int("COMMLAYER_MAILBOX_BYTES", 4 << 30),
            mailbox_messages=_env_int("COMMLAYER_MAILBOX_MESSAGES", 1 << 20),
            sockbuf=_env_int("COMMLAYER_SOCKBUF", 0),
            shm_bytes=_env_int("COMMLAYER_SHM_BYTES", 32 << 20) if os.environ.get("COMMLAYER_SHM", "1") not in ("0", "false", "no") else 0,
            liveness_floor=settings.get("COMMLAYER_LIVENESS_FLOOR"),
            liveness_ceiling=settings.get("COMMLAYER_LIVENESS_CEILING"),
            send_queue_bytes=settings.get("COMMLAYER_SEND_QUEUE_BYTES"),
        )
