"""Kernel-shaped access links: every rank in a namespace on a veth, shaped by ``tbf`` (root only).

Complements the TUN emulator (:mod:`commlayer.wan.netns`): here the kernel itself queues and
paces packets, so the link behaves exactly like a home router's bufferbloated uplink. Each rank
``i`` gets namespace ``<prefix><tag>r<i>`` with interface ``wan0`` (address ``10.77.x.y/16``, as in
netns mode), cabled to its own "modem" namespace ``<prefix><tag>m<i>`` (a bridge), which is cabled to
a core bridge namespace ``<prefix><tag>br``. Shaping, in the modem (outside the rank's own stack, so
TCP small queues cannot keep the queue short, as with a real modem):

* uplink (rank -> everyone, shared by all its flows): ``tbf`` on the modem's port to the core;
* downlink (everyone -> rank): ``tbf`` on the modem's port to the rank.

``queue_ms`` is the depth of each queue in milliseconds at line rate (``tbf latency``): a home
uplink with 0.5-3 s of buffering is ``queue_ms=500..3000``. The kernel here has no ``netem``, so
delay, jitter and loss need the TUN emulator. :meth:`KernelWorld.cut` unplugs a rank (its bridge
port goes down: no FIN, no RST, packets vanish) and :meth:`KernelWorld.restore` plugs it back.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
from dataclasses import dataclass
from typing import Any, Sequence

from commlayer.wan.netns import IFNAME, netns_unavailable_reason, rank_address

logger = logging.getLogger(__name__)

_CMD_TIMEOUT_S = 10.0
MASTER_PORT = 29500
COMMLAYER_PORT = 29600


@dataclass(frozen=True)
class AccessLink:
    """One rank's access link.

    Attributes:
        up_mbit: uplink rate, Mbit/s (1 Mbit = 10**6 bits).
        down_mbit: downlink rate, Mbit/s.
        up_queue_ms: uplink buffer, milliseconds at ``up_mbit``.
        down_queue_ms: downlink buffer, milliseconds at ``down_mbit``.
    """

    up_mbit: float
    down_mbit: float
    up_queue_ms: float = 50.0
    down_queue_ms: float = 50.0

    def __post_init__(self) -> None:
        for name in ("up_mbit", "down_mbit", "up_queue_ms", "down_queue_ms"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"AccessLink.{name}: expected a positive number, got {v!r}")


def tc_unavailable_reason() -> str | None:
    """Why kernel-shaped links cannot be built here (None if they can)."""
    reason = netns_unavailable_reason()
    if reason is not None:
        return reason
    try:
        subprocess.run(["tc", "-V"], capture_output=True, timeout=_CMD_TIMEOUT_S, check=True)
    except (OSError, subprocess.SubprocessError):
        return "kernel-shaped links need the iproute2 'tc' command"
    return None


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(args), capture_output=True, text=True, timeout=_CMD_TIMEOUT_S)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {res.stderr.strip()}")
    return res


def _tbf(ns: str, dev: str, mbit: float, queue_ms: float) -> None:
    burst = max(16 * 1024, int(mbit * 1e6 / 8 / 250))  # >= 4 ms at line rate and >= a few MTUs (HZ-independent)
    _run("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit",
         "burst", str(burst), "latency", f"{queue_ms}ms")


class KernelWorld:
    """Namespaces, veths, a bridge and ``tbf`` queues for one world; a context manager.

    Args:
        links: one :class:`AccessLink` per rank.
        prefix: start of every namespace and interface name (keep it short: names are <= 15 bytes).
        subnet: first two octets of the /16 the ranks live in.
        congestion: TCP congestion control in the ranks' namespaces. A loss-based one ("reno", or
            "cubic", the default of Linux, Windows and macOS, where the host's
            ``tcp_allowed_congestion_control`` lists it) fills a deep queue as a home user's traffic
            does; "" keeps the host's (BBR on this project's machine, which keeps queues short).
    """

    def __init__(self, links: Sequence[AccessLink], prefix: str = "clk", subnet: str = "10.77",
                 congestion: str = "reno") -> None:
        reason = tc_unavailable_reason()
        if reason is not None:
            raise PermissionError(reason)
        if not links:
            raise ValueError("expected at least one AccessLink")
        if len(prefix) > 6:
            raise ValueError(f"prefix: expected at most 6 characters (interface names are <= 15 bytes), got {prefix!r}")
        self.links = list(links)
        self.tag = secrets.token_hex(2)
        base = self._base = f"{prefix}{self.tag}"
        self.bridge_ns = f"{base}br"
        self.names = [f"{base}r{i}" for i in range(len(links))]
        self.addresses = [rank_address(i, subnet) for i in range(len(links))]
        self._ports = [f"{base}b{i}" for i in range(len(links))]
        self._created: list[str] = []
        self._closed = False
        self.congestion = congestion
        try:
            self._build(base)
        except BaseException:
            self.close()
            raise
        logger.info("kernel-shaped world %s up: %d ranks", self.tag, len(links))

    def _build(self, base: str) -> None:
        # rank ns (wan0) <-veth-> modem ns (bridge of lan + wan port, tbf on both) <-veth-> core ns (bridge).
        # The queues sit in the modem, not in the rank's own stack, so TCP small queues do not keep them
        # short: a bulk flow fills them as it fills a real modem's buffer.
        _run("ip", "netns", "add", self.bridge_ns)
        self._created.append(self.bridge_ns)
        self._bridge(self.bridge_ns)
        for i, (ns, link) in enumerate(zip(self.names, self.links)):
            modem = f"{base}m{i}"
            for name in (ns, modem):
                _run("ip", "netns", "add", name)
                self._created.append(name)
            self._bridge(modem)
            self._veth(f"{base}h{i}", ns, IFNAME, f"{base}l{i}", modem)
            self._veth(f"{base}w{i}", modem, f"{base}w{i}", self._ports[i], self.bridge_ns)
            _run("ip", "-n", ns, "addr", "add", f"{self.addresses[i]}/16", "dev", IFNAME)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            if self.congestion:
                _run("ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"net.ipv4.tcp_congestion_control={self.congestion}")
            _tbf(modem, f"{base}w{i}", link.up_mbit, link.up_queue_ms)
            _tbf(modem, f"{base}l{i}", link.down_mbit, link.down_queue_ms)

    @staticmethod
    def _bridge(ns: str) -> None:
        _run("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", ns, "link", "set", "br0", "up")

    @staticmethod
    def _veth(a: str, ns_a: str, name_a: str, b: str, ns_b: str) -> None:
        """A veth pair a/b with end a moved to ``ns_a`` (renamed ``name_a``) and end b enslaved to ``ns_b``'s bridge
        (ends without a bridge in their namespace, i.e. the rank's ``wan0``, are just brought up)."""
        _run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        _run("ip", "link", "set", a, "netns", ns_a)
        _run("ip", "link", "set", b, "netns", ns_b)
        if name_a != a:
            _run("ip", "-n", ns_a, "link", "set", a, "name", name_a)
        for ns, dev in ((ns_a, name_a), (ns_b, b)):
            if _run("ip", "-n", ns, "link", "show", "br0", check=False).returncode == 0:
                _run("ip", "-n", ns, "link", "set", dev, "master", "br0")
            _run("ip", "-n", ns, "link", "set", dev, "up")

    @property
    def world_size(self) -> int:
        return len(self.links)

    def prefix(self, rank: int) -> list[str]:
        """Command prefix that runs a command inside rank's namespace."""
        return ["ip", "netns", "exec", self.names[rank]]

    def env(self, rank: int) -> dict[str, str]:
        """torchrun's variables plus the addresses commlayer and gloo should use in rank's namespace."""
        n = self.world_size
        return {"MASTER_ADDR": self.addresses[0], "MASTER_PORT": str(MASTER_PORT), "RANK": str(rank), "WORLD_SIZE": str(n),
                "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": str(rank), "ROLE_RANK": str(rank),
                "ROLE_WORLD_SIZE": str(n), "COMMLAYER_HOST": self.addresses[rank], "COMMLAYER_PORT": str(COMMLAYER_PORT),
                "GLOO_SOCKET_IFNAME": IFNAME, "TP_SOCKET_IFNAME": IFNAME}

    def popen(self, rank: int, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Starts ``cmd`` inside rank's namespace (``subprocess.Popen`` keyword arguments pass through)."""
        return subprocess.Popen([*self.prefix(rank), *cmd], **kwargs)

    def cut(self, rank: int) -> None:
        """Unplugs rank's link: its bridge port goes down, packets vanish, nobody gets a FIN or RST."""
        _run("ip", "-n", self.bridge_ns, "link", "set", self._ports[rank], "down")

    def restore(self, rank: int) -> None:
        """Plugs rank's link back in."""
        _run("ip", "-n", self.bridge_ns, "link", "set", self._ports[rank], "up")

    def qdisc_stats(self, rank: int) -> str:
        """``tc -s qdisc`` of rank's uplink (sent, dropped, overlimits, backlog)."""
        return _run("ip", "netns", "exec", self.names[rank], "tc", "-s", "qdisc", "show", "dev", IFNAME).stdout

    def close(self) -> None:
        """Kills processes left in the namespaces and deletes them (their veths go with them)."""
        if self._closed:
            return
        self._closed = True
        for ns in self._created:
            for pid in _run("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for ns in reversed(self._created):
            _run("ip", "netns", "del", ns, check=False)
        for i in range(self.world_size):  # a veth left in the root namespace by a failed build
            for end in (f"{self._base}h{i}", f"{self._base}w{i}"):
                if os.path.exists(f"/sys/class/net/{end}"):
                    _run("ip", "link", "del", end, check=False)
        logger.info("kernel-shaped world %s torn down", self.tag)

    def __enter__(self) -> "KernelWorld":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def access_links(classes: Sequence[Any], down_queue_ms: float = 100.0) -> list[AccessLink]:
    """Kernel-shaped access links for device classes (:class:`commlayer.wan.matrix.DeviceClass`):
    their up/down rates and uplink buffer (``queue_ms``; 50 ms where a class sets none)."""
    return [AccessLink(c.up_mbit, c.down_mbit, c.queue_ms or 50.0, down_queue_ms) for c in classes]
