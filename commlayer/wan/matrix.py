"""N-rank link matrices: one :class:`LinkSpec` per directed link, and device-class composition."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Mapping

from commlayer.wan.spec import LinkConfigError, LinkSpec


@dataclass(frozen=True)
class DeviceClass:
    """An end device's access link, from which pairwise links are composed.

    Attributes:
        name: class name used in matrix files (e.g. ``"lte-phone"``).
        up_mbit: uplink rate, Mbit/s.
        down_mbit: downlink rate, Mbit/s.
        access_delay_ms: one-way delay from the device to the internet core.
        jitter_ms: delay standard deviation added by this access link.
        loss: packet loss probability of this access link.
        energy_nj_per_bit: device energy per transmitted bit.
        region: region name for :data:`REGION_ONE_WAY_MS` core delays ("" = same region).
        queue_ms: buffer of the uplink (the modem's queue), milliseconds at ``up_mbit``; links from
            this device get it as their ``queue_ms`` (0 = automatic). Home uplinks often hold 0.5-3 s.
    """

    name: str
    up_mbit: float
    down_mbit: float
    access_delay_ms: float
    jitter_ms: float = 0.0
    loss: float = 0.0
    energy_nj_per_bit: float = 0.0
    region: str = ""
    queue_ms: float = 0.0


@dataclass(frozen=True)
class LinkMatrix:
    """Directed links of an N-rank world: ``links[i][j]`` is i->j (``None`` on the diagonal).

    Attributes:
        name: profile name or file path it came from.
        links: N x N nested tuples of :class:`LinkSpec` (diagonal ``None``).
        devices: device class name per rank ("" when links were given explicitly).
        device_energy_nj_per_bit: per-rank transmit energy (nJ/bit).
    """

    name: str
    links: tuple[tuple[LinkSpec | None, ...], ...]
    devices: tuple[str, ...]
    device_energy_nj_per_bit: tuple[float, ...]

    @property
    def world_size(self) -> int:
        """Number of ranks."""
        return len(self.links)

    def link(self, src: int, dst: int) -> LinkSpec:
        """Returns the spec of directed link src->dst."""
        spec = self.links[src][dst]
        if spec is None:
            raise KeyError(f"no link {src}->{dst}")
        return spec

    def pairs(self) -> Iterator[tuple[int, int, LinkSpec]]:
        """Yields ``(src, dst, spec)`` for every directed link."""
        for i, row in enumerate(self.links):
            for j, spec in enumerate(row):
                if spec is not None:
                    yield i, j, spec

    def rtt_ms(self, a: int, b: int, t_s: float = 0.0) -> float:
        """Configured round-trip time between ranks a and b at time ``t_s``."""
        return self.link(a, b).at(t_s).delay_ms + self.link(b, a).at(t_s).delay_ms

    def validate(self) -> "LinkMatrix":
        """Checks shape and every spec; raises :class:`LinkConfigError`. Returns self."""
        n = len(self.links)
        if n < 1:
            raise LinkConfigError(f"{self.name}: expected world size >= 1, got {n}")
        for i, row in enumerate(self.links):
            if len(row) != n:
                raise LinkConfigError(f"{self.name}: row {i} has {len(row)} entries, expected {n}")
            for j, spec in enumerate(row):
                if i == j:
                    continue
                if spec is None:
                    raise LinkConfigError(f"link {i}->{j}: missing")
                spec.validate(f"link {i}->{j}")
        return self


#: One-way core delays between regions (half the WonderNetwork city-pair ping RTT, see docs/wan.md).
REGION_ONE_WAY_MS: dict[frozenset[str], float] = {
    frozenset({"us-east", "eu-west"}): 36.0,
    frozenset({"us-east", "ap-northeast"}): 87.5,
    frozenset({"us-east", "ap-southeast"}): 117.5,
    frozenset({"eu-west", "ap-northeast"}): 112.5,
    frozenset({"eu-west", "ap-southeast"}): 85.0,
    frozenset({"ap-northeast", "ap-southeast"}): 35.0,
}


def core_delay_ms(a: DeviceClass, b: DeviceClass, same_region_ms: float) -> float:
    """One-way core delay between two devices' access networks."""
    if a.region == b.region:
        return same_region_ms
    key = frozenset({a.region, b.region})
    if key not in REGION_ONE_WAY_MS:
        raise LinkConfigError(f"no core delay known between regions {a.region!r} and {b.region!r}")
    return REGION_ONE_WAY_MS[key]


def compose_link(src: DeviceClass, dst: DeviceClass, same_region_ms: float) -> LinkSpec:
    """Directed link src->dst through both access links and the core.

    rate = min(src up, dst down); delay = src access + core + dst access; jitters add in
    quadrature; losses compound; energy and the bottleneck buffer (``queue_ms``) are the sender's.
    """
    return LinkSpec(
        delay_ms=src.access_delay_ms + core_delay_ms(src, dst, same_region_ms) + dst.access_delay_ms,
        rate_mbit=min(src.up_mbit, dst.down_mbit),
        jitter_ms=math.hypot(src.jitter_ms, dst.jitter_ms),
        loss=1.0 - (1.0 - src.loss) * (1.0 - dst.loss),
        energy_nj_per_bit=src.energy_nj_per_bit,
        queue_ms=src.queue_ms,
    )


def matrix_from_devices(name: str, classes: list[DeviceClass], same_region_ms: float) -> LinkMatrix:
    """Builds the full matrix for ranks whose device classes are ``classes`` (one per rank)."""
    n = len(classes)
    links = tuple(
        tuple(None if i == j else compose_link(classes[i], classes[j], same_region_ms) for j in range(n))
        for i in range(n)
    )
    return LinkMatrix(name, links, tuple(c.name for c in classes),
                      tuple(c.energy_nj_per_bit for c in classes)).validate()


def uniform_matrix(name: str, n: int, spec: LinkSpec) -> LinkMatrix:
    """Every directed link gets ``spec``."""
    links = tuple(tuple(None if i == j else spec for j in range(n)) for i in range(n))
    return LinkMatrix(name, links, ("",) * n, (spec.energy_nj_per_bit,) * n).validate()


def replace_links(m: LinkMatrix, updates: Mapping[tuple[int, int], LinkSpec]) -> LinkMatrix:
    """Returns a copy of ``m`` with some directed links replaced."""
    rows = [list(r) for r in m.links]
    for (i, j), spec in updates.items():
        if i == j or not (0 <= i < m.world_size and 0 <= j < m.world_size):
            raise LinkConfigError(f"link {i}->{j}: not a link of a {m.world_size}-rank world")
        rows[i][j] = spec
    return LinkMatrix(m.name, tuple(tuple(r) for r in rows), m.devices, m.device_energy_nj_per_bit).validate()
