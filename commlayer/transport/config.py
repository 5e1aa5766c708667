"""Transport configuration, from environment variables or explicit values."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from commlayer import settings
from commlayer.transport.liveness import LivenessConfig


def debug_detail() -> bool:
    """``COMMLAYER_DEBUG=detail`` or torch's ``TORCH_DISTRIBUTED_DEBUG=DETAIL``: check every call's shapes across ranks."""
    mode = str(settings.get("COMMLAYER_DEBUG")).strip().lower()
    if mode not in ("off", "detail", ""):
        raise ValueError(f"COMMLAYER_DEBUG: expected off or detail, got {mode!r}")
    return mode == "detail" or os.environ.get("TORCH_DISTRIBUTED_DEBUG", "").upper() == "DETAIL"


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
        mailbox_peer_bytes: bound on such bytes from one peer. ``COMMLAYER_MAILBOX_PEER_BYTES``.
        mailbox_message_bytes: bound on one such message. ``COMMLAYER_MAILBOX_MESSAGE_BYTES``.
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
    mailbox_peer_bytes: int = 2 << 30
    mailbox_message_bytes: int = 2 << 30
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
        """The transport's rows of :mod:`commlayer.settings`, read once (``timeout`` overrides COMMLAYER_TIMEOUT)."""
        g = settings.get
        return cls(
            port=g("COMMLAYER_PORT"),
            ipc=g("COMMLAYER_IPC"),
            timeout=timeout if timeout is not None else g("COMMLAYER_TIMEOUT"),
            heartbeat=g("COMMLAYER_HEARTBEAT"),
            linger=g("COMMLAYER_LINGER"),
            mailbox_bytes=g("COMMLAYER_MAILBOX_BYTES"),
            mailbox_messages=g("COMMLAYER_MAILBOX_MESSAGES"),
            mailbox_peer_bytes=g("COMMLAYER_MAILBOX_PEER_BYTES"),
            mailbox_message_bytes=g("COMMLAYER_MAILBOX_MESSAGE_BYTES"),
            sockbuf=g("COMMLAYER_SOCKBUF"),
            shm_bytes=g("COMMLAYER_SHM_BYTES") if g("COMMLAYER_SHM") else 0,
            liveness_floor=g("COMMLAYER_LIVENESS_FLOOR"),
            liveness_ceiling=g("COMMLAYER_LIVENESS_CEILING"),
            send_queue_bytes=g("COMMLAYER_SEND_QUEUE_BYTES"),
        )
