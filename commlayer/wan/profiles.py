"""Named link profiles for the devices commlayer targets.

Numbers are representative medians drawn (from the author's knowledge, not fetched live) from
public measurement reports; docs/wan.md lists each number with its source:

* Ookla Speedtest Global Index (US fixed broadband, 2023-2024): median ~200+ Mbit/s down,
  ~20-30 Mbit/s up; FCC Measuring Broadband America (13th report): cable idle latency
  ~15-25 ms RTT to the nearest test server.
* OpenSignal US mobile network experience (2023): 4G/LTE ~25 Mbit/s down, ~8 Mbit/s up,
  ~50-60 ms latency.
* WonderNetwork global ping statistics: city-pair RTTs (New York-London ~72 ms, ...).
* Energy per transmitted bit: Huang et al., "A Close Examination of Performance and Power
  Characteristics of 4G LTE Networks", MobiSys 2012 (uplink marginal power per throughput:
  LTE ~438 mW/Mbit/s = 438 nJ/bit, Wi-Fi ~283 nJ/bit); wired is an order-of-magnitude
  assumption (few nJ/bit).
"""

from __future__ import annotations

from dataclasses import dataclass

from commlayer.wan.matrix import DeviceClass, LinkMatrix, matrix_from_devices
from commlayer.wan.spec import LinkConfigError

#: Energy per transmitted bit, nJ/bit (see module docstring).
ENERGY_NJ_PER_BIT = {"lte": 438.0, "wifi": 283.0, "wired": 5.0, "datacenter": 2.0}

#: Built-in device classes, usable by name in link-matrix files.
DEVICE_CLASSES: dict[str, DeviceClass] = {
    c.name: c
    for c in (
        DeviceClass("datacenter", 1000.0, 1000.0, 0.05, 0.0, 0.0, ENERGY_NJ_PER_BIT["datacenter"]),
        DeviceClass("fiber-server", 500.0, 500.0, 2.0, 0.2, 0.0, ENERGY_NJ_PER_BIT["wired"]),
        DeviceClass("home-broadband", 20.0, 200.0, 8.0, 2.0, 5e-5, ENERGY_NJ_PER_BIT["wired"]),
        DeviceClass("wifi-edge", 10.0, 50.0, 12.0, 5.0, 1e-4, ENERGY_NJ_PER_BIT["wifi"]),
        DeviceClass("lte-phone", 8.0, 25.0, 25.0, 8.0, 1e-4, ENERGY_NJ_PER_BIT["lte"]),
        # Bufferbloated home uplinks (docs/wan.md, "Bufferbloat"): modem queues of 1-3 s at the uplink rate.
        DeviceClass("dsl-bloated", 1.0, 10.0, 15.0, 2.0, 1e-4, ENERGY_NJ_PER_BIT["wired"], queue_ms=3000.0),
        DeviceClass("cable-bloated", 5.0, 50.0, 8.0, 2.0, 5e-5, ENERGY_NJ_PER_BIT["wired"], queue_ms=1000.0),
        DeviceClass("lte-bloated", 5.0, 20.0, 25.0, 8.0, 1e-4, ENERGY_NJ_PER_BIT["lte"], queue_ms=500.0),
        DeviceClass("wan-20mbit-50ms", 20.0, 20.0, 12.5, 0.0, 0.0, ENERGY_NJ_PER_BIT["wired"]),
        DeviceClass("cloud-us-east", 100.0, 100.0, 0.5, 0.5, 0.0, ENERGY_NJ_PER_BIT["datacenter"], "us-east"),
        DeviceClass("cloud-eu-west", 100.0, 100.0, 0.5, 0.5, 0.0, ENERGY_NJ_PER_BIT["datacenter"], "eu-west"),
        DeviceClass("cloud-ap-northeast", 100.0, 100.0, 0.5, 0.5, 0.0, ENERGY_NJ_PER_BIT["datacenter"], "ap-northeast"),
        DeviceClass("cloud-ap-southeast", 100.0, 100.0, 0.5, 0.5, 0.0, ENERGY_NJ_PER_BIT["datacenter"], "ap-southeast"),
    )
}


@dataclass(frozen=True)
class Profile:
    """A named world: device classes cycled over the ranks plus the same-region core delay.

    Attributes:
        name: profile name.
        description: one line for ``--help`` and docs.
        devices: device class names, assigned to ranks round-robin.
        core_delay_ms: one-way core delay between access networks in the same region.
    """

    name: str
    description: str
    devices: tuple[str, ...]
    core_delay_ms: float

    def matrix(self, world_size: int) -> LinkMatrix:
        """The link matrix of this profile for ``world_size`` ranks."""
        if world_size < 1:
            raise LinkConfigError(f"profile {self.name}: expected world_size >= 1, got {world_size}")
        classes = [DEVICE_CLASSES[self.devices[r % len(self.devices)]] for r in range(world_size)]
        return matrix_from_devices(self.name, classes, self.core_delay_ms)


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("datacenter", "LAN in one datacenter: 1 Gbit/s, 0.1 ms one-way", ("datacenter",), 0.0),
        Profile("home-broadband", "homes on cable/fiber in one region: 20 Mbit/s up, 26 ms one-way",
                ("home-broadband",), 10.0),
        Profile("wifi-edge", "edge boxes on home Wi-Fi: 10 Mbit/s up, 34 ms one-way, 7 ms jitter",
                ("wifi-edge",), 10.0),
        Profile("lte", "phones on 4G/LTE: 8 Mbit/s up, 60 ms one-way, 11 ms jitter", ("lte-phone",), 10.0),
        Profile("intercontinental", "cloud VMs in 4 regions, 100 Mbit/s per flow, 70-235 ms RTT",
                ("cloud-us-east", "cloud-eu-west", "cloud-ap-northeast", "cloud-ap-southeast"), 0.0),
        Profile("hetero", "mixed: fiber server, home broadband, Wi-Fi edge box, LTE phone (cycled)",
                ("fiber-server", "home-broadband", "wifi-edge", "lte-phone"), 10.0),
        Profile("dsl-bufferbloat", "DSL homes: 1 Mbit/s up / 10 down, 3 s of uplink buffer (bufferbloat)",
                ("dsl-bloated",), 10.0),
        Profile("home-bufferbloat", "cable homes and LTE phones with deep buffers: 5 Mbit/s up, 0.5-1 s of queue",
                ("cable-bloated", "lte-bloated"), 10.0),
        Profile("wan-20mbit-50ms", "uniform 20 Mbit/s, 50 ms RTT (default benchmark profile)",
                ("wan-20mbit-50ms",), 0.0),
    )
}

DEFAULT_PROFILE = "wan-20mbit-50ms"


def profile_matrix(name: str, world_size: int) -> LinkMatrix:
    """Returns the link matrix of named profile ``name`` for ``world_size`` ranks.

    Raises:
        LinkConfigError: unknown profile name.
    """
    if name not in PROFILES:
        raise LinkConfigError(f"unknown profile {name!r}; known: {sorted(PROFILES)}")
    return PROFILES[name].matrix(world_size)
