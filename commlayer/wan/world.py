"""``emulated_world``: one call that brings up an emulated N-rank world and yields its env vars."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Mapping

from commlayer.testing.ports import free_port
from commlayer.wan.energy import device_energy_j
from commlayer.wan.loader import resolve_links
from commlayer.wan.matrix import LinkMatrix
from commlayer.wan.netns import IFNAME, NetnsWorld
from commlayer.wan.profiles import DEFAULT_PROFILE
from commlayer.wan.relay import RelayWorld, start_relays

logger = logging.getLogger(__name__)

Mode = Literal["relay", "netns"]
#: Fixed ports inside namespaces (every rank has its own port space there).
NETNS_MASTER_PORT = 29500
NETNS_COMMLAYER_PORT = 29600


@dataclass(frozen=True)
class EmulatedWorld:
    """An emulated world that is up; produced by :func:`emulated_world`.

    Attributes:
        links: the link matrix.
        mode: "relay" or "netns".
        envs: per-rank environment additions (torchrun's variables plus COMMLAYER_*).
        prefixes: per-rank command prefix (empty in relay mode, ``ip netns exec NS`` in netns).
        addresses: per-rank address its endpoint listens on.
        backend: the RelayWorld or NetnsWorld doing the work.
    """

    links: LinkMatrix
    mode: Mode
    envs: list[dict[str, str]]
    prefixes: list[list[str]]
    addresses: list[str]
    backend: RelayWorld | NetnsWorld
    t0: float = field(default=0.0)

    def env(self, rank: int) -> dict[str, str]:
        """Environment additions for ``rank``."""
        return dict(self.envs[rank])

    def prefix(self, rank: int) -> list[str]:
        """Command prefix that runs a command as ``rank`` would (inside its namespace)."""
        return list(self.prefixes[rank])

    def bytes_sent(self) -> list[int]:
        """Bytes each rank has sent into its emulated links so far (IP bytes in netns mode)."""
        return self.backend.bytes_sent()

    def energy_j(self) -> list[float]:
        """Estimated transmit energy per rank so far, from :meth:`bytes_sent`."""
        return device_energy_j(self.bytes_sent(), self.links)


def _torchrun_env(rank: int, n: int, master_addr: str, master_port: int) -> dict[str, str]:
    return {"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "RANK": str(rank),
            "WORLD_SIZE": str(n), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(n), "GROUP_RANK": "0",
            "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(n)}


@contextlib.contextmanager
def emulated_world(nproc: int, links: str | os.PathLike[str] | Mapping[str, Any] | LinkMatrix = DEFAULT_PROFILE,
                   mode: Mode = "relay", seed: int = 0, listen_ports: list[int] | None = None,
                   mtu: int = 1500) -> Iterator[EmulatedWorld]:
    """Brings up an emulated world of ``nproc`` local ranks; tears it down on exit.

    Args:
        nproc: number of ranks.
        links: profile name, link-matrix JSON path, parsed JSON object or LinkMatrix.
        mode: "relay" (user-space TCP relays, no root; the transport must honour
            COMMLAYER_PORT/COMMLAYER_CONNECT_OVERRIDES) or "netns" (root; any backend).
        seed: seed for jitter/loss.
        listen_ports: relay mode: the ranks' COMMLAYER_PORT values (default: free ports).
        mtu: netns mode: MTU of each rank's interface.

    Yields:
        An :class:`EmulatedWorld` with per-rank env additions and command prefixes.
    """
    if nproc < 1:
        raise ValueError(f"expected nproc >= 1, got {nproc}")
    m = resolve_links(links, nproc)
    t0 = time.monotonic()
    backend: RelayWorld | NetnsWorld
    if mode == "relay":
        ports = list(listen_ports) if listen_ports is not None else [free_port() for _ in range(nproc)]
        backend = start_relays(m, ports, seed=seed, t0=t0)
        master_port = free_port()
        envs = [{**_torchrun_env(r, nproc, "127.0.0.1", master_port), **backend.env(r)} for r in range(nproc)]
        prefixes: list[list[str]] = [[] for _ in range(nproc)]
        addresses = ["127.0.0.1"] * nproc
    elif mode == "netns":
        backend = NetnsWorld(m, seed=seed, t0=t0, mtu=mtu)
        addresses = list(backend.addresses)
        envs = [{**_torchrun_env(r, nproc, addresses[0], NETNS_MASTER_PORT), "COMMLAYER_HOST": addresses[r],
                 "COMMLAYER_PORT": str(NETNS_COMMLAYER_PORT), "GLOO_SOCKET_IFNAME": IFNAME,
                 "TP_SOCKET_IFNAME": IFNAME} for r in range(nproc)]
        prefixes = [backend.prefix(r) for r in range(nproc)]
    else:
        raise ValueError(f"expected mode 'relay' or 'netns', got {mode!r}")
    for e in envs:
        e["COMMLAYER_WAN_LINKS"] = m.name
    try:
        yield EmulatedWorld(m, mode, envs, prefixes, addresses, backend, t0)
    finally:
        backend.close()
