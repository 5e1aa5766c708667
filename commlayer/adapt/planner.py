"""The closed-loop controller: measure, predict, choose a plan, watch for drift, re-plan.

Every rank of a group runs one :class:`Planner`. Plans are a pure function of the agreed link
matrix (all-gathered probe results), the agreed codec profiles and the policy, so all ranks derive
the same plan without a broadcast; each plan carries ``version`` and a tag that the executor puts
in the operation name, so ranks on different plans get a "collective mismatch" error, never a
hang or a wrong sum.

Loop per training step (all ranks, same order)::

    plan = planner.plan(nbytes, dtype, exact=True)   # cached per size
    ... run the all-reduce with plan ...
    planner.observe(plan, nbytes, seconds)           # local: measured vs predicted
    planner.maybe_replan(step)                       # collective, non-blocking exchange

``maybe_replan`` sends this rank's drift summary and reads everyone's summary of the *previous*
call (already in flight, so it costs no round trip). If any rank saw the measured time leave the
prediction by more than ``drift_threshold`` (or the probe budget allows a periodic refresh), all
ranks re-probe together and bump the version: a change beyond ``drift_urgent`` shows up in the plan
at most 2 steps later; a smaller drift re-probes once it has cost as much time as the last probe.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from commlayer.adapt import policy as pol
from commlayer.adapt.cost import EXACT, CodecProfile, CostParams
from commlayer.adapt.estimator import Ewma, LinkMatrixSnapshot, LinkState, install_hooks
from commlayer.adapt.exchange import allgather_vector, recv_vectors, send_vector
from commlayer.adapt.execute import measure_codec, merge_profiles, profile_vector
from commlayer.adapt.metrics import MetricsSink
from commlayer.adapt.probe import ProbeConfig, probe_links
from commlayer.transport.errors import CommError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """How to run one all-reduce; identical on every rank.

    Attributes:
        version: plan epoch (bumped on every re-plan).
        algo: a registered algorithm (:mod:`commlayer.topologies.registry`; the candidates: "ring", "tree").
        chunk_bytes: ring pipeline chunk.
        ring_order: ring order (group ranks) or None for the identity.
        codec_spec: codec spec, "" = exact.
        window: chunks in flight that fill the ring's bandwidth-delay product.
        predicted_s: the cost model's time.
        reason: why this plan won.
    """

    version: int
    algo: str
    chunk_bytes: int
    ring_order: tuple[int, ...] | None
    codec_spec: str
    window: int
    predicted_s: float
    reason: str = field(default="", compare=False)

    @property
    def digest(self) -> str:
        key = f"{self.version}|{self.algo}|{self.chunk_bytes}|{self.ring_order}|{self.codec_spec}"
        return hashlib.blake2s(key.encode(), digest_size=4).hexdigest()

    @property
    def tag(self) -> str:
        """Short identifier carried in operation names (``v3-1a2b3c4d``)."""
        return f"v{self.version}-{self.digest}"

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version, "tag": self.tag, "algo": self.algo, "chunk_bytes": self.chunk_bytes,
                "ring_order": list(self.ring_order) if self.ring_order else None, "codec": self.codec_spec,
                "window": self.window, "predicted_s": self.predicted_s, "reason": self.reason}


@dataclass(frozen=True)
class PlannerConfig:
    """Controller knobs.

    Attributes:
        policy: what "best" means (see :mod:`commlayer.adapt.policy`).
        chunk_candidates: ring chunk sizes considered.
        drift_threshold: re-probe when any rank's smoothed measured/predicted time leaves [1/(1+t), 1+t]...
        drift_min_s: ...and the smoothed measured time is more than this many seconds off the prediction (on
            fast links a loaded CPU makes every collective take several times its prediction, a few ms each:
            re-probing would not change the plan, only cost probes).
        drift_urgent: a smoothed ratio beyond [1/u, u] re-probes at once (a rate drop: the issue's "within
            3 steps"); a drift between ``1 + drift_threshold`` and this must first have cost as much time as
            the last probe took (the summed |measured - predicted| since it, on the rank where it is largest):
            on a loaded CPU, CPU-bound compressed collectives drift 1.5-2x with unchanged links, and each
            re-probe (4-6 s on 4 ranks at 20 Mbit/s) would cost more than the misprediction it can fix.
        probe_budget: fraction of collective time that periodic re-probes may take (0.01 = 1 %).
        min_reprobe_steps: at least this many steps between drift-triggered re-probes.
        weight: EWMA weight of a new observation.
        probe: active probe knobs.
        cost: CPU constants of the cost model.
        channel: transport channel of the controller's own messages.
        timeout: seconds for any controller wait.
        metrics_path: JSON-lines file for decisions and measurements ("" = none).
    """

    policy: pol.Policy = field(default_factory=pol.Policy)
    chunk_candidates: tuple[int, ...] = (64 << 10, 256 << 10, 1 << 20, 4 << 20)
    drift_threshold: float = 0.5
    drift_min_s: float = 0.05
    drift_urgent: float = 3.0
    probe_budget: float = 0.01
    min_reprobe_steps: int = 3
    weight: float = 0.5
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    cost: CostParams = field(default_factory=CostParams)
    channel: str = "__adapt__"
    timeout: float = 60.0
    metrics_path: str = ""


class Planner:
    """Per-group controller. Collective methods (``start``, ``maybe_replan``, ``close``) must be called
    by every rank of the group in the same order.

    Args:
        transport: this rank's connected transport.
        ranks: global ranks of the group in group order.
        config: controller knobs.
    """

    def __init__(self, transport: Any, ranks: Sequence[int], config: PlannerConfig | None = None) -> None:
        self.transport, self.ranks = transport, list(ranks)
        self.config = config or PlannerConfig()
        self.size = len(self.ranks)
        self.rank = self.ranks.index(transport.rank)
        self.state = LinkState(transport.rank, transport.world_size, self.config.weight)
        self.metrics = MetricsSink(self.config.metrics_path, transport.rank)
        self.snapshot: LinkMatrixSnapshot | None = None
        self.codecs: dict[str, CodecProfile] = {"": EXACT}
        self.version = 0
        self._epoch = 0
        self._cache: dict[tuple, Plan] = {}
        self._ratio = Ewma(self.config.weight)
        self._excess = Ewma(self.config.weight)
        self._calls = 0
        self._last_probe_call = 0
        self._backoff = self.config.min_reprobe_steps
        self._probe_s = 0.0
        self._last_probe_s = 0.0  # duration of the latest probe on this rank
        self._missed_s = 0.0  # summed |measured - predicted| since the latest probe
        self._collective_s = 0.0
        self._uninstall = install_hooks(transport, self.state)
        self.replans: list[dict[str, Any]] = []

    # ---- collective setup ----------------------------------------------------------------------
    def start(self) -> LinkMatrixSnapshot:
        """Probes every link and measures the policy's codecs; all ranks agree on the results."""
        specs = [s for s in self.config.policy.codecs if s] if self.config.policy.mode != "exact" else []
        mine = [x for s in specs for x in profile_vector(measure_codec(s))]
        if specs:
            rows = allgather_vector(self.transport, self.ranks, self.config.channel, 1 << 30, mine, self.config.timeout,
                                    op="adapt-codecs")
            for k, s in enumerate(specs):
                self.codecs[s] = merge_profiles(s, [r[5 * k:5 * k + 5] for r in rows])
                self.metrics.emit("codec_profile", **vars(self.codecs[s]))
        self._reprobe("start")
        return self.snapshot  # type: ignore[return-value]

    def _reprobe(self, why: str) -> None:
        self._epoch += 1
        res = probe_links(self.transport, self.ranks, self.config.probe, self._epoch, self.state)
        self._probe_s += res.seconds
        self._last_probe_s, self._missed_s = res.seconds, 0.0
        old = self.snapshot
        self.snapshot = res.snapshot
        self.version += 1
        self._cache.clear()
        self._ratio = Ewma(self.config.weight)
        self._excess = Ewma(self.config.weight)
        self._last_probe_call = self._calls
        self.replans.append({"version": self.version, "call": self._calls, "why": why})
        self.metrics.emit("replan", version=self.version, why=why, probe_s=res.seconds, links=res.snapshot.as_dict()["links"])
        logger.info("rank %d: plan version %d (%s)", self.transport.rank, self.version, why)
        if old is not None and _close(old, res.snapshot, self.config.drift_threshold / 2):
            self._backoff = min(self._backoff * 2, 1000)  # the links did not change: the model is off, back off
        else:
            self._backoff = self.config.min_reprobe_steps

    # ---- planning ------------------------------------------------------------------------------
    def plan(self, nbytes: int, dtype: torch.dtype = torch.float32, exact: bool = True) -> Plan:
        """The plan for an all-reduce of ``nbytes`` (cached; the same on every rank)."""
        if self.snapshot is None:
            raise RuntimeError("Expected Planner.start() before plan()")
        key = (int(nbytes), str(dtype), bool(exact) or not dtype.is_floating_point)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        codecs = [EXACT] if key[2] else [self.codecs[s] for s in self.codecs]
        cand = pol.candidates(self.snapshot, nbytes, codecs, self.config.chunk_candidates, self.config.cost)
        best, reason = pol.choose(cand, self.config.policy, exact=key[2])
        window = pol.window(self.snapshot, best)
        plan = Plan(self.version, best.algo, best.chunk_bytes, best.order, best.codec.spec, window, best.seconds, reason)
        self._cache[key] = plan
        self.metrics.emit("plan", nbytes=nbytes, dtype=str(dtype), exact=key[2], **plan.as_dict(),
                          alternatives=[c.as_dict() for c in sorted(cand, key=lambda c: c.seconds)[:5]])
        return plan

    def predict(self, nbytes: int, algo: str, order: Sequence[int] | None, chunk_bytes: int, codec: str = "") -> float:
        """The cost model's seconds for one configuration (on the current matrix)."""
        from commlayer.adapt.cost import allreduce_time

        if self.snapshot is None:
            raise RuntimeError("Expected Planner.start() before predict()")
        return allreduce_time(self.snapshot, nbytes, algo, order, chunk_bytes, self.config.cost, self.codecs.get(codec, EXACT))

    # ---- feedback ------------------------------------------------------------------------------
    def observe(self, plan: Plan, nbytes: int, seconds: float, extra: dict[str, Any] | None = None) -> None:
        """Records one all-reduce run with ``plan`` that took ``seconds`` on this rank (local, cheap)."""
        self._collective_s += seconds
        if plan.version == self.version and plan.predicted_s > 0:
            self._ratio.update(seconds / plan.predicted_s)
            self._excess.update(seconds - plan.predicted_s)
            self._missed_s += abs(seconds - plan.predicted_s)
        self.metrics.emit("collective", plan=plan.tag, nbytes=nbytes, seconds=seconds, predicted_s=plan.predicted_s,
                          achieved_mbit=nbytes * 8e-6 / seconds if seconds > 0 else None, **(extra or {}))

    def maybe_replan(self, step: int) -> bool:
        """Collective: exchanges drift summaries and re-probes when needed. Returns True on a re-plan."""
        cfg = self.config
        call = self._calls
        self._calls += 1
        r = self._ratio.mean if self._ratio.n else 1.0
        excess = abs(self._excess.mean) if self._excess.n else 0.0
        mine = [float(step), r, float(self._ratio.n), self._collective_s, float(self.version), self._probe_s, excess,
                self._missed_s, self._last_probe_s]
        send_vector(self.transport, self.ranks, cfg.channel, call, mine, op="adapt-drift")
        if call == 0:
            self._prev = mine
            return False
        rows = recv_vectors(self.transport, self.ranks, cfg.channel, call - 1, self._prev, cfg.timeout, op="adapt-drift")
        self._prev = mine
        if len({row[0] for row in rows}) != 1 or len({row[4] for row in rows}) != 1:
            raise CommError(f"planner mismatch at call {call - 1}: ranks report steps {[row[0] for row in rows]} and plan versions "
                            f"{[row[4] for row in rows]}; every rank must call maybe_replan once per step")
        if rows[0][4] != self.version:  # a re-probe happened since those were sent: they describe the old plan
            return False
        ratios = [row[1] for row in rows if row[2] > 0 and row[6] > cfg.drift_min_s]
        worst = max(ratios, key=lambda x: abs(math.log(max(x, 1e-9)))) if ratios else 1.0
        since = call - self._last_probe_call
        why = ""
        drifted = bool(ratios) and (worst > 1 + cfg.drift_threshold or worst < 1 / (1 + cfg.drift_threshold))
        urgent = drifted and (worst > cfg.drift_urgent or worst < 1 / cfg.drift_urgent)
        missed, probe_cost = max(row[7] for row in rows), max(row[8] for row in rows)
        if drifted and since >= self._backoff and (urgent or missed >= probe_cost):
            why = (f"drift: measured/predicted = {worst:.2f} (threshold {cfg.drift_threshold}"
                   + (f", urgent beyond {cfg.drift_urgent:g})" if urgent else
                      f"; {missed:.2f} s mispredicted since the last probe, which took {probe_cost:.2f} s)"))
        elif cfg.probe_budget > 0 and self._probe_s > 0 and since >= self._backoff:
            elapsed, spent = max(row[3] for row in rows), max(row[5] for row in rows)
            if spent * (1 + 1.0 / max(1, self._epoch)) <= cfg.probe_budget * elapsed:
                why = f"periodic: probes {spent:.2f} s within {cfg.probe_budget:.1%} of {elapsed:.1f} s"
        if not why:
            return False
        self._reprobe(why)
        return True

    # ---- observability / teardown --------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """The link-state matrix, counters and plans, as one JSON-able dict."""
        return {"rank": self.transport.rank, "version": self.version,
                "matrix": self.snapshot.as_dict() if self.snapshot else None,
                "estimates": [e.as_dict() for e in self.state.estimates()], "counters": self.state.counters(),
                "plans": [p.as_dict() for p in self._cache.values()], "probe_s": self._probe_s,
                "collective_s": self._collective_s, "replans": list(self.replans)}

    def close(self) -> None:
        """Removes the transport hooks and closes the metrics file (local)."""
        self._uninstall()
        self.metrics.close()


def _close(a: LinkMatrixSnapshot, b: LinkMatrixSnapshot, tol: float) -> bool:
    p = a.size
    return all(abs(a.beta[i][j] / b.beta[i][j] - 1) <= tol for i in range(p) for j in range(p) if i != j and b.beta[i][j] > 0)
