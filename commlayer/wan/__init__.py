"""commlayer.wan: WAN link emulation for tests, the CLI and benchmarks (never imported by the library).

Two modes over the same link model (:mod:`commlayer.wan.pipe`):

* relay (no root): user-space TCP relays per directed link on loopback
  (:func:`start_relays`); the transport honours COMMLAYER_PORT and COMMLAYER_CONNECT_OVERRIDES.
* netns (root): each rank in its own network namespace, packets carried between TUN devices
  by a user-space forwarder (:class:`NetnsWorld`); works for any backend, gloo included.
* kernel-shaped (root, ``tc``): namespaces on veths, access links shaped by the kernel's ``tbf``
  with deep (bufferbloated) queues, asymmetric up/down (:class:`KernelWorld`); no delay/loss (no netem).

Entry points: :func:`emulated_world`, :func:`launch`, :func:`resolve_links`, :data:`PROFILES`.
"""

from __future__ import annotations

from commlayer.wan.energy import device_energy_j, link_energy_j
from commlayer.wan.kernel import AccessLink, KernelWorld, access_links, tc_unavailable_reason
from commlayer.wan.launch import launch
from commlayer.wan.loader import load_links, resolve_links
from commlayer.wan.matrix import DeviceClass, LinkMatrix
from commlayer.wan.netns import NetnsWorld, netem_available, netns_unavailable_reason
from commlayer.wan.profiles import DEFAULT_PROFILE, DEVICE_CLASSES, PROFILES, profile_matrix
from commlayer.wan.relay import RelayWorld, start_relays
from commlayer.wan.spec import LinkConfigError, LinkParams, LinkSpec, ScheduleStep, tcp_rate_mbit
from commlayer.wan.world import EmulatedWorld, emulated_world

__all__ = [
    "AccessLink", "KernelWorld", "access_links", "tc_unavailable_reason",
    "DEFAULT_PROFILE", "DEVICE_CLASSES", "PROFILES", "DeviceClass", "EmulatedWorld", "LinkConfigError",
    "LinkMatrix", "LinkParams", "LinkSpec", "NetnsWorld", "RelayWorld", "ScheduleStep", "device_energy_j",
    "emulated_world", "launch", "link_energy_j", "load_links", "netem_available", "netns_unavailable_reason",
    "profile_matrix", "resolve_links", "start_relays", "tcp_rate_mbit",
]
