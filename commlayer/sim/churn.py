"""Churn and heterogeneous devices: who is online each round, and how fast each node computes.

Churn is a two-state Markov chain per node (Godfrey, Shenker & Stoica, "Minimizing churn in
distributed systems", SIGCOMM 2006, model the same on/off sessions): an online node leaves with
probability ``leave`` per round, an offline one returns with probability ``rejoin``. Starting in
the stationary state, a fraction ``rejoin / (leave + rejoin)`` of the nodes is online.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Relative compute speed of each device class (a phone ~1/8 of a home server); unknown classes: 1.
DEVICE_SPEED = {"datacenter": 4.0, "fiber-server": 2.0, "home-broadband": 1.0, "wifi-edge": 0.5, "lte-phone": 0.125,
                "dsl-bloated": 1.0, "cable-bloated": 1.0, "lte-bloated": 0.125}


@dataclass
class Churn:
    """Online/offline state of ``n`` nodes, advanced once per round with a private RNG.

    Attributes:
        n: nodes. leave: per-round leave probability. rejoin: per-round return probability.
        keep: nodes that never leave (e.g. the PS servers), by index.
    """

    n: int
    leave: float
    rejoin: float = 0.5
    seed: int = 0
    keep: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        if not (0.0 <= self.leave < 1.0 and 0.0 < self.rejoin <= 1.0):
            raise ValueError(f"Expected 0 <= leave < 1 and 0 < rejoin <= 1, got leave={self.leave}, rejoin={self.rejoin}")
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self.alive = self._rng.random(self.n) < self.rejoin / (self.leave + self.rejoin)
        self.alive[list(self.keep)] = True

    def step(self, r: int) -> np.ndarray:
        """The online mask of round ``r`` (advances the chain; call once per round in order)."""
        if r > 0:
            u = self._rng.random(self.n)
            self.alive = np.where(self.alive, u >= self.leave, u < self.rejoin)
            self.alive[list(self.keep)] = True
        return self.alive.copy()


def speeds_for(devices: list[str], default: float = 1.0) -> np.ndarray:
    """Per-node compute speed from device class names (:data:`DEVICE_SPEED`)."""
    return np.array([DEVICE_SPEED.get(d, default) for d in devices], dtype=float)
