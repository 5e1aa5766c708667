"""``COMMLAYER_CODEC=auto``: the one place that decides how each gradient bucket is compressed.

Per bucket (a float all-reduce of one size, keyed ``"<numel>:<dtype>"``) and on every rank in the
same call order (the backend runs it on the group's executor):

1. call 0 runs exact and measures every candidate codec on this rank's own bucket: relative error
   ``||C(g) - g|| / ||g||`` (one step, no error-feedback memory), encode and decode seconds;
2. call 1 runs exact and sends those numbers, with the timings seen in the issuing thread (the
   compute a bucket can overlap with = time from its arrival to the step's last bucket; compute
   per step = step period minus the communication the step waited for), to every rank;
3. call 2 reads everyone's numbers (already in flight: no round trip), merges them pessimistically
   (largest error and codec time, smallest window) and plans; every later call runs that plan.

A plan is a pure function of agreed inputs (the planner's all-gathered link matrix, the merged
numbers, the policy), so every rank derives the same one; its tag goes into the operation name,
so ranks that disagree fail with "collective mismatch". Plans are cached per (link version,
measurement epoch): when the planner re-probes after drift (:meth:`Planner.maybe_replan`, called
once per bucket), the next call re-plans. Measurements refresh every ``refresh`` calls.
Decisions, bytes per step and compute utilization are JSON-lines events (``COMMLAYER_METRICS``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from commlayer.adapt import policy as pol
from commlayer.adapt.cost import EXACT, CodecProfile
from commlayer.adapt.exchange import recv_vectors, send_vector
from commlayer.adapt.execute import CodecCache, execute
from commlayer.adapt.planner import Plan, Planner
from commlayer.codecs import CodecContext, aggregation_mode, from_spec
from commlayer.codecs.powersgd import shape_wire_bytes as wire_bytes
from commlayer.topologies.comm import OpComm
from commlayer.topologies.reduce_ops import ReduceOp, finalize_

logger = logging.getLogger(__name__)

#: Candidates in order of increasing loss (biased compressors carry error feedback).
DEFAULT_CANDIDATES = ("fp16", "int8+ef", "powersgd:rank=32+ef", "powersgd:rank=8+ef", "topk:ratio=0.01+ef",
                      "powersgd:rank=2+ef", "topk:ratio=0.001+ef")
_TIMING = 3  # window, compute per step, step period


@dataclass(frozen=True)
class AutoConfig:
    """Knobs of the controller (``COMMLAYER_ADAPT_POLICY`` / ``_ERROR_BUDGET`` / ``_COMPUTE_S`` / ``_AUTO_CODECS``).

    Attributes:
        mode: a :mod:`commlayer.adapt.policy` mode; "auto" = least error within ``slack`` of the fastest step.
        error_budget: largest one-step relative error of an admitted codec (measured on the real bucket).
        compute_s: overlappable compute per bucket in seconds (0 = measured between bucket arrivals).
        candidates: codec specs considered besides exact.
        slack: "auto" mode's tolerance on the step time.
        refresh: calls of a bucket between re-measurements of its codecs and timings.
        channel: transport channel of the controller's exchanges.
        timeout: seconds for any exchange.
    """

    mode: str = "auto"
    error_budget: float = 0.9
    compute_s: float = 0.0
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES
    slack: float = 0.1
    refresh: int = 200
    channel: str = "__autocodec__"
    timeout: float = 60.0

    def __post_init__(self) -> None:
        pol.Policy(self.mode, self.error_budget, self.compute_s, slack=self.slack)  # validates
        if self.refresh < 3:
            raise ValueError(f"AutoConfig.refresh: expected >= 3, got {self.refresh}")
        for spec in self.candidates:
            from_spec(spec)  # raises a SpecError naming the bad token


@dataclass(frozen=True)
class Ticket:
    """One compressible all-reduce, numbered in the issuing thread."""

    key: str
    index: int  # order of the key's first appearance (agreed: every rank issues the same calls)
    call: int  # calls of this key before this one
    serial: int  # calls of any key before this one


@dataclass
class _Bucket:
    index: int
    numel: int
    calls: int = 0
    window_s: float = math.nan
    merged: list[float] | None = None  # agreed numbers of the current measurement epoch
    epoch: int = 0
    local: list[float] = field(default_factory=list)
    sent: list[float] = field(default_factory=list)  # this rank's row of the current exchange, as sent
    plans: dict[tuple[int, int], Plan] = field(default_factory=dict)


class AutoCodec:
    """The per-group controller. ``issue`` runs in the issuing thread, ``run`` on the group's executor.

    Args:
        planner: the group's started link planner (link matrix, drift, re-probes).
        config: policy knobs.
        seed: shared seed of stochastic codecs.
    """

    def __init__(self, planner: Planner, config: AutoConfig | None = None, seed: int = 0) -> None:
        self.planner, self.config, self.seed = planner, config or AutoConfig(), seed
        self.ranks, self.transport = planner.ranks, planner.transport
        self.metrics = planner.metrics
        self.codecs = CodecCache()
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}
        self._serial = 0
        self._step: list[tuple[str, float, int]] = []  # (key, issue time, serial) of the current step
        self._done: dict[int, float] = {}
        self._compute = math.nan  # per step, seconds
        self._period = math.nan
        self._step_bytes = 0
        self._steps = 0
        self.decisions: list[dict[str, Any]] = []
        self.last_plan: Plan | None = None

    # ---- issuing thread --------------------------------------------------------------------------
    def issue(self, flat: torch.Tensor) -> Ticket:
        """Numbers one all-reduce of ``flat`` and records its arrival (bucket timing)."""
        key = f"{flat.numel()}:{str(flat.dtype).removeprefix('torch.')}"
        now = time.monotonic()
        with self._lock:
            if any(k == key for k, _, _ in self._step):
                self._end_step(now)
            b = self._buckets.get(key)
            if b is None:
                b = self._buckets[key] = _Bucket(len(self._buckets), flat.numel())
            t = Ticket(key, b.index, b.calls, self._serial)
            b.calls += 1
            self._serial += 1
            self._step.append((key, now, t.serial))
            return t

    def _end_step(self, now: float) -> None:
        """A bucket came back: the previous step is complete (called under the lock)."""
        last_t, last_serial = self._step[-1][1], self._step[-1][2]
        for key, t, _ in self._step:
            b = self._buckets[key]
            w = last_t - t
            b.window_s = w if math.isnan(b.window_s) else 0.5 * (b.window_s + w)
        period = now - self._step[0][1]
        waited = max(0.0, self._done.get(last_serial, last_t) - last_t)
        compute = max(0.0, period - waited)
        self._compute = compute if math.isnan(self._compute) else 0.5 * (self._compute + compute)
        self._period = period if math.isnan(self._period) else 0.5 * (self._period + period)
        self._steps += 1
        self.metrics.emit("auto_step", step=self._steps, period_s=period, compute_s=compute, waited_s=waited,
                          utilization=compute / period if period > 0 else None, wire_bytes=self._step_bytes,
                          buckets=len(self._step))
        self._step_bytes = 0
        self._step = []
        self._done.clear()

    # ---- executor ----------------------------------------------------------------------------------
    def run(self, comm: OpComm, flat: torch.Tensor, op: ReduceOp, ticket: Ticket) -> dict[str, Any]:
        """All-reduces ``flat`` (float SUM/AVG) in place as this bucket's plan says; returns what happened."""
        b = self._buckets[ticket.key]
        phase = ticket.call % self.config.refresh
        if phase == 0:
            b.local = self._measure(flat, ticket)
        elif phase == 1:
            b.sent = b.local + self._timing(b)
            send_vector(self.transport, self.ranks, self.config.channel, self._seq(ticket), b.sent, op="auto-measure")
        elif phase == 2:
            rows = recv_vectors(self.transport, self.ranks, self.config.channel, self._seq(ticket.index, ticket.call - 1),
                                b.sent, self.config.timeout, op="auto-measure")
            b.merged, b.epoch = _merge(rows, len(self.config.candidates)), b.epoch + 1
        plan = self._plan(b, flat) if b.merged is not None else self._exact_plan(flat, "measuring the codecs on this bucket")
        info = self._execute(comm, flat, op, plan, ticket)
        self.last_plan = plan
        self.planner.observe(plan, info["bytes"], info["seconds"], {"codec": plan.codec_spec, "wire_bytes": info["wire_bytes"]})
        if self.planner.maybe_replan(ticket.serial):
            logger.info("links re-probed at call %d: plans will be re-derived", ticket.serial)
        with self._lock:  # after any re-probe: the step waited for it too
            self._done[ticket.serial] = time.monotonic()
            self._step_bytes += info["wire_bytes"]
        return info

    def _seq(self, ticket_or_index: Ticket | int, call: int | None = None) -> int:
        if isinstance(ticket_or_index, Ticket):
            return (ticket_or_index.index << 32) | ticket_or_index.call
        return (ticket_or_index << 32) | int(call or 0)

    def _timing(self, b: _Bucket) -> list[float]:
        with self._lock:
            w = b.window_s if self.config.compute_s <= 0 else self.config.compute_s
            return [0.0 if math.isnan(w) else w, 0.0 if math.isnan(self._compute) else self._compute,
                    0.0 if math.isnan(self._period) else self._period]

    def _measure(self, flat: torch.Tensor, ticket: Ticket) -> list[float]:
        """[error, encode s, decode s] per candidate, on this rank's bucket (fresh codecs: no EF memory)."""
        out: list[float] = []
        x = flat.detach()
        norm = float(x.float().norm()) or 1.0
        ctx = CodecContext((x.numel(),), x.dtype, key=f"__auto_measure__{ticket.key}", step=ticket.call, seed=self.seed)
        for spec in self.config.candidates:
            codec = from_spec(spec)
            t0 = time.perf_counter()
            enc = codec.encode(x, ctx)
            t1 = time.perf_counter()
            y = codec.decode(enc, ctx)
            t2 = time.perf_counter()
            out += [float((y.float() - x.float()).norm()) / norm, t1 - t0, t2 - t1]
        return out

    # ---- planning ----------------------------------------------------------------------------------
    def _exact_plan(self, flat: torch.Tensor, why: str) -> Plan:
        p = self.planner.plan(flat.numel() * flat.element_size(), flat.dtype, exact=True)
        return Plan(p.version, p.algo, p.chunk_bytes, p.ring_order, "", p.window, p.predicted_s, f"{why}; {p.reason}")

    def _plan(self, b: _Bucket, flat: torch.Tensor) -> Plan:
        """The agreed plan of bucket ``b`` for the current link version and measurement epoch."""
        key = (self.planner.version, b.epoch)
        cached = b.plans.get(key)
        if cached is not None:
            return cached
        assert b.merged is not None and self.planner.snapshot is not None
        nbytes = flat.numel() * flat.element_size()
        n = len(self.config.candidates)
        window, compute, _period = b.merged[3 * n:3 * n + _TIMING]
        profiles = [EXACT] + [_profile(spec, b.merged[3 * k:3 * k + 3], flat) for k, spec in enumerate(self.config.candidates)]
        cfg = self.planner.config
        policy = pol.Policy(self.config.mode, self.config.error_budget, window, step_s=compute, slack=self.config.slack)
        cands = pol.candidates(self.planner.snapshot, nbytes, profiles, cfg.chunk_candidates, cfg.cost)
        best, reason = pol.choose(cands, policy, exact=False)
        old = next(iter(b.plans.values()), None)
        if old is not None and old.codec_spec != best.codec.spec and self.config.mode == "auto":
            same = [c for c in cands if c.codec.spec == old.codec_spec]  # hysteresis: noisy re-probes must not flip codecs
            keep = min(same, key=pol.Candidate.sort_key) if same else None
            if keep is not None and pol.time_to_progress(keep, policy) <= (1 + self.config.slack) * pol.time_to_progress(best, policy):
                reason = f"kept {old.codec_spec or 'exact'}: within {self.config.slack:.0%} of the new best; was: {reason}"
                best = keep
        lower = self.planner.snapshot.meta.get("lower_bound")
        if best.codec.spec and lower and any(any(row) for row in lower):
            best = min((c for c in cands if not c.codec.spec), key=pol.Candidate.sort_key)
            reason = ("exact: some link's bandwidth is only a lower bound (its probe was CPU-bound, the link may be "
                      f"faster), so compression cannot be shown to pay; the lossy choice was: {reason}")
        plan = Plan(self.planner.version, best.algo, best.chunk_bytes, best.order, best.codec.spec,
                    pol.window(self.planner.snapshot, best), best.seconds, reason)
        b.plans = {key: plan}
        exact_s = min(c.seconds for c in cands if not c.codec.spec)
        rec = {"bucket": b.index, "nbytes": nbytes, "link_version": self.planner.version, "epoch": b.epoch,
               **plan.as_dict(), "rel_error": best.codec.rel_error, "wire_ratio": best.codec.ratio,
               "overlap_s": window, "compute_s": compute, "exact_predicted_s": exact_s,
               "candidates": [{"codec": c.codec.spec or "exact", "rel_error": c.codec.rel_error, "predicted_s": c.seconds,
                               "within_budget": not c.codec.spec or c.codec.rel_error <= self.config.error_budget}
                              for c in _best_per_codec(cands)]}
        self.decisions.append(rec)
        self.metrics.emit("auto_plan", **rec)
        logger.info("bucket %d (%d bytes): %s", b.index, nbytes, reason)
        return plan

    def _execute(self, comm: OpComm, flat: torch.Tensor, op: ReduceOp, plan: Plan, ticket: Ticket) -> dict[str, Any]:
        if not plan.codec_spec:
            info = execute(comm, flat, op, plan)
            finalize_(flat, op, comm.size)
            return info
        codec = self.codecs.get(plan.codec_spec)
        ctx = CodecContext((flat.numel(),), flat.dtype, key=ticket.key, step=ticket.call, seed=self.seed)
        info = execute(comm, flat, op, plan, codec, ctx)
        info["wire_bytes"] = wire_bytes(codec, (flat.numel(),), flat.dtype)
        return info

    def report(self) -> dict[str, Any]:
        """The latest decision per bucket and the step timings, as one JSON-able dict."""
        with self._lock:
            latest = {d["bucket"]: d for d in self.decisions}
            return {"decisions": [latest[k] for k in sorted(latest)], "steps": self._steps,
                    "compute_s": self._compute, "period_s": self._period,
                    "utilization": self._compute / self._period if self._period and self._period > 0 else None}


def _merge(rows: Sequence[Sequence[float]], n: int) -> list[float]:
    """Pessimistic agreement: the largest error and codec time, the smallest window, the largest compute."""
    out = [max(r[k] for r in rows) for k in range(3 * n)]
    out.append(min(r[3 * n] for r in rows))
    out += [max(r[3 * n + k] for r in rows) for k in (1, 2)]
    return out


def _profile(spec: str, vals: Sequence[float], flat: torch.Tensor) -> CodecProfile:
    codec = from_spec(spec)
    raw = flat.numel() * flat.element_size()
    err, enc_s, dec_s = vals
    mode = aggregation_mode(codec)
    return CodecProfile(spec, wire_bytes(codec, (flat.numel(),), flat.dtype) / raw, raw / max(enc_s, 1e-9),
                        raw / max(dec_s, 1e-9), err, linear=mode in ("allreduce", "powersgd"),
                        rounds=2 if mode == "powersgd" else 1)


def _best_per_codec(cands: Sequence[pol.Candidate]) -> list[pol.Candidate]:
    best: dict[str, pol.Candidate] = {}
    for c in cands:
        if c.codec.spec not in best or c.sort_key() < best[c.codec.spec].sort_key():
            best[c.codec.spec] = c
    return sorted(best.values(), key=pol.Candidate.sort_key)
