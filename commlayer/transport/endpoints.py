"""Where a rank listens and how peers reach it: host choice and endpoint exchange via the c10d store."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import uuid
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

from commlayer import settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EndpointInfo:
    """What a rank publishes about itself.

    Attributes:
        rank: global rank.
        tcp: TCP endpoint (always present).
        ipc: IPC endpoint for peers on the same machine ("" if disabled).
        host_id: identifies the machine (hostname + boot id), to detect co-located peers.
        pid: process id (for messages).
        nonce: random per-process id; distinguishes a restarted peer from the old one.
        curve_public: this rank's CURVE public key (z85), "" when encryption is off.
        routed: this rank reaches some peers through COMMLAYER_CONNECT_OVERRIDES (a tunnel or proxy), so its
            goodbye may trail its exit: peers do not treat its death as instantly visible even on one machine.
    """

    rank: int
    tcp: str
    ipc: str
    host_id: str
    pid: int
    nonce: str
    curve_public: str = ""
    routed: bool = False

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes | str, peer: int) -> "EndpointInfo":
        try:
            d: dict[str, Any] = json.loads(data)
            return cls(int(d["rank"]), str(d["tcp"]), str(d["ipc"]), str(d["host_id"]), int(d["pid"]), str(d["nonce"]),
                       str(d.get("curve_public", "")), bool(d.get("routed", False)))
        except Exception as exc:
            raise RuntimeError(f"rank {peer} published an unreadable endpoint record {data!r} ({exc}); "
                               "are all ranks running the same commlayer version?") from None


def host_id() -> str:
    boot = ""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        pass
    # Network namespaces on one machine share the boot id but not the loopback, so include
    # the namespace identity when we can read it.
    try:
        netns = os.readlink("/proc/self/ns/net")
    except OSError:
        netns = ""
    return f"{socket.gethostname()}|{boot}|{netns}"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def choose_host() -> str:
    """The interface address to listen on.

    ``COMMLAYER_HOST`` wins; otherwise the local address of the route towards torchrun's
    ``MASTER_ADDR`` (loopback when MASTER_ADDR is local or unset). No packet is sent.
    """
    explicit = settings.get("COMMLAYER_HOST")
    if explicit:
        return explicit
    master = os.environ.get("MASTER_ADDR", "")
    if not master or _is_loopback(master):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((socket.gethostbyname(master), int(os.environ.get("MASTER_PORT", "29500"))))
            return str(s.getsockname()[0])
    except OSError as exc:
        logger.warning("could not find the interface towards MASTER_ADDR=%s (%s); listening on 127.0.0.1; "
                       "set COMMLAYER_HOST to this host's address", master, exc)
        return "127.0.0.1"


def ipc_path(rank: int) -> str:
    base = settings.get("COMMLAYER_IPC_DIR")
    remove_stale(base, ".sock")
    return os.path.join(base, f"commlayer-{os.getpid()}-{rank}-{uuid.uuid4().hex[:8]}.sock")


def remove_stale(base: str, suffix: str) -> None:
    """Deletes ``commlayer-<pid>-...<suffix>`` files left by killed processes (their pid no longer exists)."""
    try:
        names = [n for n in os.listdir(base) if n.startswith("commlayer-") and n.endswith(suffix)]
    except OSError:
        return
    for n in names[:1000]:
        try:
            pid = int(n.split("-")[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(base, n))
            except OSError:
                pass
        except (ValueError, IndexError, PermissionError):
            continue


def connect_overrides() -> dict[int, str]:
    """``COMMLAYER_CONNECT_OVERRIDES``: JSON {peer global rank: endpoint} used instead of the peer's own
    (the WAN emulator routes links through relays this way)."""
    raw = settings.get("COMMLAYER_CONNECT_OVERRIDES")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
        return {int(k): str(v) for k, v in data.items()}
    except Exception as exc:
        raise ValueError(f"COMMLAYER_CONNECT_OVERRIDES: expected a JSON object {{rank: endpoint}}, got {raw!r} ({exc})") from None


def peer_address(info: EndpointInfo, my_host_id: str, override: str | None) -> str:
    """Where to connect to the peer ``info``: its override if any, else ipc:// on this machine, else TCP."""
    if override is not None:
        return override
    return info.ipc if info.ipc and info.host_id == my_host_id else info.tcp


def exchange_endpoints(store: Any, rank: int, world_size: int, mine: EndpointInfo, timeout: float,
                       prefix: str = "commlayer/ep") -> dict[int, EndpointInfo]:
    """Publishes this rank's endpoints in the c10d store and reads every peer's.

    Runs in the thread that creates the process group (never from a background thread: the
    TCPStore client is single-flight).
    """
    store.set(f"{prefix}/{rank}", mine.to_json())
    keys = [f"{prefix}/{p}" for p in range(world_size) if p != rank]
    try:
        store.wait(keys, timedelta(seconds=timeout))
    except Exception as exc:
        missing = [k.rsplit("/", 1)[1] for k in keys if not store.check([k])]
        raise RuntimeError(f"rank {rank}: ranks {missing} did not publish their commlayer endpoints within "
                           f"{timeout:.0f} s ({exc}); did they all call init_process_group with backend 'zmq'?") from None
    out = {rank: mine}
    for p in range(world_size):
        if p != rank:
            out[p] = EndpointInfo.from_json(store.get(f"{prefix}/{p}"), p)
    return out
