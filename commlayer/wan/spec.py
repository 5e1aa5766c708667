"""Per-directed-link parameters: :class:`LinkSpec`, its time-varying schedule, and validation.

A :class:`LinkSpec` describes one *directed* link i->j (the reverse direction j->i is its own
spec). All delays are one-way; the round-trip time of a pair is ``d(i->j) + d(j->i)``. Rates are
in Mbit/s with 1 Mbit = 10**6 bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

#: Maximum TCP segment payload assumed by the TCP loss model (1500-byte MTU, IPv4+TCP+timestamps).
TCP_MSS_BYTES = 1448
#: Mathis et al. constant sqrt(3/2) for periodic loss with delayed ACKs off.
MATHIS_C = math.sqrt(1.5)


class LinkConfigError(ValueError):
    """A link matrix, profile or spec is invalid; the message names the link and the field."""


@dataclass(frozen=True)
class ScheduleStep:
    """From ``at_s`` seconds after the emulation started, override some link parameters.

    Fields left ``None`` keep the value of the previous step (or of the base spec).
    """

    at_s: float
    delay_ms: float | None = None
    rate_mbit: float | None = None
    jitter_ms: float | None = None
    loss: float | None = None


@dataclass(frozen=True)
class LinkParams:
    """The instantaneous parameters of a link (a spec evaluated at one time)."""

    delay_ms: float
    rate_mbit: float
    jitter_ms: float
    loss: float

    @property
    def rate_bytes_per_s(self) -> float:
        """Link rate in bytes per second."""
        return self.rate_mbit * 1e6 / 8.0


@dataclass(frozen=True)
class LinkSpec:
    """One directed link.

    Attributes:
        delay_ms: one-way propagation delay in milliseconds (>= 0).
        rate_mbit: bottleneck rate in Mbit/s (> 0).
        jitter_ms: standard deviation of a normal per-packet delay variation (>= 0); the total
            delay is clipped at 0 and packets are never reordered.
        loss: per-packet (per-TCP-segment) loss probability in [0, 1).
        schedule: time-ordered overrides, e.g. ``(ScheduleStep(60.0, rate_mbit=10.0),)``.
        energy_nj_per_bit: estimated sender energy per transmitted bit (for benchmarks).
        queue_ms: bottleneck buffer, in milliseconds of data at the current rate, beyond what
            the delay already keeps in flight; 0 means automatic (max(50 ms, 2 x delay)).
    """

    delay_ms: float
    rate_mbit: float
    jitter_ms: float = 0.0
    loss: float = 0.0
    schedule: tuple[ScheduleStep, ...] = field(default=())
    energy_nj_per_bit: float = 0.0
    queue_ms: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, tuple):
            object.__setattr__(self, "schedule", tuple(self.schedule))

    def at(self, t_s: float) -> LinkParams:
        """Returns the parameters in force ``t_s`` seconds after the emulation started."""
        p = LinkParams(self.delay_ms, self.rate_mbit, self.jitter_ms, self.loss)
        for step in self.schedule:
            if step.at_s > t_s:
                break
            p = LinkParams(
                p.delay_ms if step.delay_ms is None else step.delay_ms,
                p.rate_mbit if step.rate_mbit is None else step.rate_mbit,
                p.jitter_ms if step.jitter_ms is None else step.jitter_ms,
                p.loss if step.loss is None else step.loss,
            )
        return p

    def queue_s(self, params: LinkParams) -> float:
        """Bottleneck buffer in seconds for the given instantaneous parameters."""
        if self.queue_ms > 0:
            return self.queue_ms / 1000.0
        return max(0.05, 2.0 * params.delay_ms / 1000.0)

    def validate(self, where: str = "link") -> "LinkSpec":
        """Checks every field; raises :class:`LinkConfigError` naming ``where``. Returns self."""
        _check(where, "delay_ms", self.delay_ms, lo=0.0)
        _check(where, "rate_mbit", self.rate_mbit, lo=0.0, lo_open=True)
        _check(where, "jitter_ms", self.jitter_ms, lo=0.0)
        _check(where, "loss", self.loss, lo=0.0, hi=1.0)
        _check(where, "energy_nj_per_bit", self.energy_nj_per_bit, lo=0.0)
        _check(where, "queue_ms", self.queue_ms, lo=0.0)
        last = -math.inf
        for k, step in enumerate(self.schedule):
            w = f"{where} schedule[{k}]"
            _check(w, "at_s", step.at_s, lo=0.0)
            if step.at_s <= last:
                raise LinkConfigError(f"{w}: expected at_s increasing, got {step.at_s} after {last}")
            last = step.at_s
            if step.delay_ms is not None:
                _check(w, "delay_ms", step.delay_ms, lo=0.0)
            if step.rate_mbit is not None:
                _check(w, "rate_mbit", step.rate_mbit, lo=0.0, lo_open=True)
            if step.jitter_ms is not None:
                _check(w, "jitter_ms", step.jitter_ms, lo=0.0)
            if step.loss is not None:
                _check(w, "loss", step.loss, lo=0.0, hi=1.0)
        return self

    def with_(self, **changes: Any) -> "LinkSpec":
        """Returns a copy with some fields replaced (``dataclasses.replace``)."""
        return replace(self, **changes)


def tcp_rate_mbit(params: LinkParams, rtt_ms: float, mss: int = TCP_MSS_BYTES) -> float:
    """Rate one TCP flow achieves on a link: ``min(rate, Mathis bound)``.

    The Mathis et al. (1997) bound is ``MSS / RTT * C / sqrt(p)`` with ``C = sqrt(3/2)``.
    """
    if params.loss <= 0.0 or rtt_ms <= 0.0:
        return params.rate_mbit
    mathis = mss * 8 / (rtt_ms / 1000.0) * MATHIS_C / math.sqrt(params.loss) / 1e6
    return min(params.rate_mbit, mathis)


def _check(where: str, name: str, value: Any, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise LinkConfigError(f"{where}: expected {name} to be a number, got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise LinkConfigError(f"{where}: expected {name} {'>' if lo_open else '>='} {lo:g}, got {value:g}")
    if hi is not None and value >= hi:
        raise LinkConfigError(f"{where}: expected {name} < {hi:g}, got {value:g}")
    if math.isinf(value) and name != "rate_mbit":
        raise LinkConfigError(f"{where}: expected {name} finite, got {value}")


_SPEC_FIELDS = ("delay_ms", "rate_mbit", "jitter_ms", "loss", "energy_nj_per_bit", "queue_ms")
_STEP_FIELDS = ("at_s", "delay_ms", "rate_mbit", "jitter_ms", "loss")


def spec_from_dict(d: Mapping[str, Any], where: str, base: LinkSpec | None = None) -> LinkSpec:
    """Builds a validated :class:`LinkSpec` from a JSON object, on top of ``base`` if given.

    Raises:
        LinkConfigError: unknown keys, missing required fields or out-of-range values.
    """
    if not isinstance(d, Mapping):
        raise LinkConfigError(f"{where}: expected an object, got {type(d).__name__}")
    unknown = set(d) - set(_SPEC_FIELDS) - {"schedule", "src", "dst", "both"}
    if unknown:
        raise LinkConfigError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {list(_SPEC_FIELDS) + ['schedule']}")
    values: dict[str, Any] = {} if base is None else {f: getattr(base, f) for f in _SPEC_FIELDS}
    values.update({k: d[k] for k in _SPEC_FIELDS if k in d})
    for req in ("delay_ms", "rate_mbit"):
        if req not in values:
            raise LinkConfigError(f"{where}: missing required field {req}")
    sched: tuple[ScheduleStep, ...] = () if base is None else base.schedule
    if "schedule" in d:
        if not isinstance(d["schedule"], list):
            raise LinkConfigError(f"{where}: expected schedule to be a list, got {type(d['schedule']).__name__}")
        steps = []
        for k, s in enumerate(d["schedule"]):
            if not isinstance(s, Mapping) or "at_s" not in s:
                raise LinkConfigError(f"{where} schedule[{k}]: expected an object with at_s, got {s!r}")
            bad = set(s) - set(_STEP_FIELDS)
            if bad:
                raise LinkConfigError(f"{where} schedule[{k}]: unknown field(s) {sorted(bad)}")
            steps.append(ScheduleStep(**{k2: s[k2] for k2 in _STEP_FIELDS if k2 in s}))
        sched = tuple(steps)
    return LinkSpec(schedule=sched, **values).validate(where)
