"""Link models the simulator reads, vectorized over message batches, built from the WAN emulator's profiles and files.

Two layouts, one interface (:meth:`SimLinks.pair`):

* **devices** (any size, O(n) memory): each node has a device class (access uplink/downlink rate,
  access delay, jitter, loss, energy per bit, uplink buffer, region); a pair's link is composed
  exactly as the emulator composes it (:func:`commlayer.wan.matrix.compose_link`: rate = min(src
  up, dst down), delay = both access delays + core, jitters in quadrature, losses compounded).
  Built from a profile name, a ``devices`` link file, or a mix ``mix:home-broadband=0.9,lte-phone=0.1``.
* **matrix** (small worlds): the full directed matrix of :class:`commlayer.wan.LinkSpec` from a link
  file with per-link overrides, including time-varying ``schedule`` steps.

The rate of a lossy link is the relay's: capped by the Mathis bound (:func:`commlayer.wan.tcp_rate_mbit`).
:meth:`SimLinks.snapshot` gives the same links as the adapt cost model's
:class:`~commlayer.adapt.estimator.LinkMatrixSnapshot` (alpha = one-way delay, beta = that rate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from commlayer.adapt.estimator import LinkMatrixSnapshot
from commlayer.wan import PROFILES, LinkConfigError, LinkMatrix, load_links, resolve_links
from commlayer.wan.matrix import REGION_ONE_WAY_MS, DeviceClass
from commlayer.wan.profiles import DEVICE_CLASSES
from commlayer.wan.spec import MATHIS_C, TCP_MSS_BYTES

MBIT = 1e6 / 8.0


@dataclass(frozen=True)
class PairParams:
    """Vectorized parameters of a batch of directed links (arrays broadcast to the batch's shape)."""

    delay_s: np.ndarray
    rate_Bps: np.ndarray
    jitter_s: np.ndarray
    loss: np.ndarray
    rtt_s: np.ndarray


class SimLinks:
    """Links of an ``n``-node world (see the module docstring)."""

    def __init__(self, name: str, n: int, *, classes: list[DeviceClass] | None = None, assign: np.ndarray | None = None,
                 core_same_s: float = 0.0, matrix: LinkMatrix | None = None) -> None:
        self.name, self.n = name, n
        self.matrix = matrix
        self._t = math.nan
        if matrix is not None:
            self.devices = list(matrix.devices)
            self.energy_J_per_B = np.array(matrix.device_energy_nj_per_bit, dtype=float) * 8e-9
            self._timed = [(i, j, s) for i, j, s in matrix.pairs() if s.schedule]
            self._load_matrix(0.0)
            self.up_Bps = np.where(np.isinf(self._rate), 0, self._rate).max(axis=1)
            self.down_Bps = np.where(np.isinf(self._rate), 0, self._rate).max(axis=0)
            self.queue_s = np.array([max((matrix.link(i, j).queue_s(matrix.link(i, j).at(0)) for j in range(n) if j != i),
                                         default=0.05) for i in range(n)])
            return
        assert classes is not None and assign is not None
        self.classes, self.assign = classes, assign
        self.devices = [classes[k].name for k in assign]
        col = {f: np.array([getattr(c, f) for c in classes], dtype=float)[assign]
               for f in ("up_mbit", "down_mbit", "access_delay_ms", "jitter_ms", "loss", "energy_nj_per_bit", "queue_ms")}
        self.up_Bps, self.down_Bps = col["up_mbit"] * MBIT, col["down_mbit"] * MBIT
        self._acc, self._jit, self._loss = col["access_delay_ms"] / 1e3, col["jitter_ms"] / 1e3, col["loss"]
        self.energy_J_per_B = col["energy_nj_per_bit"] * 8e-9
        regions = sorted({c.region for c in classes})
        self._region = np.array([regions.index(classes[k].region) for k in assign])
        core = np.zeros((len(regions), len(regions)))
        for a, ra in enumerate(regions):
            for b, rb in enumerate(regions):
                core[a, b] = core_same_s if ra == rb else REGION_ONE_WAY_MS[frozenset({ra, rb})] / 1e3
        self._core = core
        self.queue_s = np.where(col["queue_ms"] > 0, col["queue_ms"] / 1e3, 0.05)

    # ---- matrix layout ------------------------------------------------------------------------
    def _load_matrix(self, t_s: float) -> None:
        m = self.matrix
        assert m is not None
        n = self.n
        d, r, j, lo = (np.zeros((n, n)), np.full((n, n), math.inf), np.zeros((n, n)), np.zeros((n, n)))
        for a, b, spec in m.pairs():
            p = spec.at(t_s)
            d[a, b], r[a, b], j[a, b], lo[a, b] = p.delay_ms / 1e3, p.rate_mbit * MBIT, p.jitter_ms / 1e3, p.loss
        self._delay, self._rate, self._jitm, self._lossm = d, r, j, lo
        self._t = t_s

    def at(self, t_s: float) -> None:
        """Moves time-varying links (``schedule`` steps of a link file) to time ``t_s``."""
        if self.matrix is not None and self._timed and t_s != self._t:
            self._load_matrix(t_s)

    @property
    def time_varying(self) -> bool:
        return bool(self.matrix is not None and self._timed)

    # ---- the one accessor ---------------------------------------------------------------------
    def pair(self, src: np.ndarray, dst: np.ndarray) -> PairParams:
        """Parameters of the directed links ``src -> dst`` (broadcast arrays of node ids)."""
        if self.matrix is not None:
            d, r, jt, lo = self._delay[src, dst], self._rate[src, dst], self._jitm[src, dst], self._lossm[src, dst]
            rtt = d + self._delay[dst, src]
        else:
            d = self._acc[src] + self._core[self._region[src], self._region[dst]] + self._acc[dst]
            r = np.minimum(self.up_Bps[src], self.down_Bps[dst])
            jt = np.hypot(self._jit[src], self._jit[dst])
            lo = 1.0 - (1.0 - self._loss[src]) * (1.0 - self._loss[dst])
            rtt = 2 * d
        with np.errstate(divide="ignore"):
            mathis = np.where(lo > 0, TCP_MSS_BYTES / np.maximum(rtt, 1e-9) * MATHIS_C / np.sqrt(np.maximum(lo, 1e-300)), math.inf)
        return PairParams(d, np.minimum(r, mathis), jt, lo, rtt)

    def snapshot(self) -> LinkMatrixSnapshot:
        """These links as the adapt cost model sees them (alpha = one-way delay, beta = achievable rate)."""
        i, j = np.meshgrid(np.arange(self.n), np.arange(self.n), indexing="ij")
        pp = self.pair(i, j)
        alpha = np.where(i == j, 0.0, pp.delay_s)
        beta = np.where(i == j, math.inf, pp.rate_Bps)
        return LinkMatrixSnapshot.from_lists(alpha.tolist(), beta.tolist())

    def describe(self) -> dict[str, Any]:
        kinds: dict[str, int] = {}
        for d in self.devices:
            kinds[d or "custom"] = kinds.get(d or "custom", 0) + 1
        return {"name": self.name, "nodes": self.n, "devices": kinds, "layout": "matrix" if self.matrix is not None else "devices"}


def _mix(spec: str, n: int, seed: int) -> SimLinks:
    parts = [p for p in spec.removeprefix("mix:").split(",") if p]
    names, fracs = [], []
    for p in parts:
        name, _, frac = p.partition("=")
        if name not in DEVICE_CLASSES:
            raise LinkConfigError(f"{spec}: unknown device class {name!r}; known: {sorted(DEVICE_CLASSES)}")
        try:
            fracs.append(float(frac or 1.0))
        except ValueError:
            raise LinkConfigError(f"{spec}: expected CLASS=FRACTION, got {p!r}") from None
        names.append(name)
    w = np.array(fracs) / sum(fracs)
    counts = np.floor(w * n).astype(int)
    counts[: n - counts.sum()] += 1
    assign = np.repeat(np.arange(len(names)), counts)
    np.random.Generator(np.random.PCG64(seed)).shuffle(assign)
    return SimLinks(spec, n, classes=[DEVICE_CLASSES[k] for k in names], assign=assign, core_same_s=0.010)


def sim_links(links: str | LinkMatrix, n: int, seed: int = 0) -> SimLinks:
    """A profile name, a link file, ``mix:CLASS=FRAC,...`` or a LinkMatrix, as simulator links for ``n`` nodes.

    Profiles and mixes use the O(n) device layout at any size; files with per-link entries the matrix layout.

    Raises:
        LinkConfigError: unknown name or invalid file.
    """
    if isinstance(links, LinkMatrix):
        return SimLinks(links.name, n, matrix=resolve_links(links, n))
    if links.startswith("mix:"):
        return _mix(links, n, seed)
    if links in PROFILES:
        prof = PROFILES[links]
        classes = [DEVICE_CLASSES[d] for d in prof.devices]
        return SimLinks(links, n, classes=classes, assign=np.arange(n) % len(classes), core_same_s=prof.core_delay_ms / 1e3)
    if n > 2048:
        raise LinkConfigError(f"{links}: a link file is read as a full {n}x{n} matrix; expected at most 2048 nodes "
                              "(use a profile or mix:CLASS=FRAC,... for fleet-scale worlds)")
    return SimLinks(links, n, matrix=load_links(links, n))


def pipe_stall_probability(nbytes: np.ndarray, pp: PairParams) -> np.ndarray:
    """Chance that a message ends behind a retransmission stall, as the relay pipe models loss.

    The pipe holds a lost unit back one RTT and releases nothing before it, so a message is late by
    one RTT when any segment of its last RTT of data is lost: ``1 - (1 - loss) ** segments``.
    """
    segs = np.minimum(nbytes, pp.rate_Bps * pp.rtt_s) / TCP_MSS_BYTES
    return np.where(pp.loss > 0, -np.expm1(segs * np.log1p(-np.minimum(pp.loss, 0.999))), 0.0)
