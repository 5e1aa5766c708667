"""Mode B: every rank in its own network namespace, links emulated at packet level (root only).

Each rank gets namespace ``clw<tag>r<i>`` with one interface ``wan0`` (a TUN device) holding
address ``10.77.<i // 250>.<i % 250 + 1>/16``. A forwarder process in the root namespace
(:mod:`commlayer.wan.tunfwd`) carries every packet between the TUN devices through the
emulated link (rate, delay, jitter, real loss, drop-tail buffer), so any backend (gloo,
plain sockets, commlayer's transport) sees the same links. The host kernel here has no
``netem``; :func:`netem_available` reports whether it does (the TUN forwarder is used either
way; see docs/wan.md).
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import signal
import subprocess
import time
from typing import Any, Sequence

from commlayer.wan._proc import ControlledChild
from commlayer.wan.matrix import LinkMatrix

logger = logging.getLogger(__name__)

IFNAME = "wan0"
_CMD_TIMEOUT_S = 10.0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=_CMD_TIMEOUT_S)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {res.stderr.strip()}")
    return res


def netns_unavailable_reason() -> str | None:
    """Why namespace mode cannot run here (None if it can): needs root, ``ip`` and /dev/net/tun."""
    if os.geteuid() != 0:
        return "namespace mode needs root (ip netns, TUN devices)"
    if not os.path.exists("/dev/net/tun"):
        return "namespace mode needs /dev/net/tun"
    try:
        subprocess.run(["ip", "-V"], capture_output=True, timeout=_CMD_TIMEOUT_S, check=True)
    except (OSError, subprocess.SubprocessError):
        return "namespace mode needs the iproute2 'ip' command"
    return None


@functools.lru_cache(maxsize=1)
def netem_available() -> bool:
    """Whether the kernel has the ``netem`` qdisc (tried on lo of a throwaway namespace)."""
    if netns_unavailable_reason() is not None:
        return False
    ns = f"clwprobe{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", ns)
        res = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
                              "delay", "1ms"], capture_output=True, timeout=_CMD_TIMEOUT_S)
        return res.returncode == 0
    except (OSError, subprocess.SubprocessError, RuntimeError):
        return False
    finally:
        _ip("netns", "del", ns, check=False)


def rank_address(rank: int, subnet: str = "10.77") -> str:
    """IPv4 address of ``rank`` inside its namespace."""
    return f"{subnet}.{rank // 250}.{rank % 250 + 1}"


class NetnsWorld:
    """Namespaces, TUN links and the forwarder for one world; a context manager.

    Args:
        links: the link matrix (its world size is the number of namespaces).
        seed: seed for jitter/loss generators.
        t0: ``time.monotonic()`` origin of the schedules (default: when the links come up).
        mtu: MTU of every ``wan0``.
        subnet: first two octets of the /16 the ranks live in.
        prefix: start of the namespace and TUN device names (<= 6 characters).

    Attributes:
        names: namespace name per rank.
        addresses: IPv4 address per rank.
    """

    def __init__(self, links: LinkMatrix, seed: int = 0, t0: float | None = None, mtu: int = 1500,
                 subnet: str = "10.77", prefix: str = "clw") -> None:
        reason = netns_unavailable_reason()
        if reason is not None:
            raise PermissionError(reason)
        n = links.world_size
        if n > 250 * 250:
            raise ValueError(f"too many ranks for one /16: {n}")
        self.links = links
        self.tag = secrets.token_hex(3)
        if len(prefix) > 6:
            raise ValueError(f"prefix: expected at most 6 characters (device names are <= 15 bytes), got {prefix!r}")
        self.names = [f"{prefix}{self.tag}r{i}" for i in range(n)]
        self.addresses = [rank_address(i, subnet) for i in range(n)]
        self._tuns = [f"{prefix}{self.tag}t{i}" for i in range(n)]
        self._created: list[str] = []
        self._fwd: ControlledChild | None = None
        self._closed = False
        try:
            for ns in self.names:
                _ip("netns", "add", ns)
                self._created.append(ns)
            start = time.monotonic() if t0 is None else t0
            self._fwd = ControlledChild("tunfwd", (links, self._tuns, self.addresses, start, seed))
            for i, ns in enumerate(self.names):
                _ip("link", "set", self._tuns[i], "netns", ns)
                _ip("-n", ns, "link", "set", self._tuns[i], "name", IFNAME)
                _ip("-n", ns, "link", "set", IFNAME, "mtu", str(mtu), "up")
                _ip("-n", ns, "addr", "add", f"{self.addresses[i]}/16", "dev", IFNAME)
                _ip("-n", ns, "link", "set", "lo", "up")
            self.t0 = start
        except BaseException:
            self.close()
            raise
        logger.info("namespace world %s up: %d ranks", self.tag, n)

    def prefix(self, rank: int) -> list[str]:
        """Command prefix that runs a command inside rank's namespace."""
        return ["ip", "netns", "exec", self.names[rank]]

    def popen(self, rank: int, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Starts ``cmd`` inside rank's namespace (``subprocess.Popen`` keyword arguments pass through)."""
        return subprocess.Popen([*self.prefix(rank), *cmd], **kwargs)

    def run(self, rank: int, cmd: Sequence[str], timeout_s: float, **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Runs ``cmd`` inside rank's namespace to completion (bounded by ``timeout_s``)."""
        return subprocess.run([*self.prefix(rank), *cmd], timeout=timeout_s, **kwargs)

    def stats(self) -> dict[Any, Any]:
        """Forwarder counters per directed link (bytes, units, dropped_units, dropped_bytes)."""
        assert self._fwd is not None
        return self._fwd.call("stats")

    def bytes_sent(self) -> list[int]:
        """IP bytes each rank has sent into its links (including dropped packets)."""
        out = [0] * self.links.world_size
        for key, s in self.stats().items():
            if isinstance(key, tuple):
                out[key[0]] += int(s["bytes"] + s["dropped_bytes"])
        return out

    def close(self) -> None:
        """Kills processes left in the namespaces, stops the forwarder, deletes the namespaces."""
        if self._closed:
            return
        self._closed = True
        for ns in self._created:
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        if self._fwd is not None:
            self._fwd.close()
        for ns in self._created:
            _ip("netns", "del", ns, check=False)
        logger.info("namespace world %s torn down", self.tag)

    def __enter__(self) -> "NetnsWorld":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
