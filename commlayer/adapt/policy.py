"""Policies and the candidate search of the controller.

Candidates are every (algorithm, ring order, chunk size, codec) the cost model can price, for
each algorithm the registry marks as a candidate (:func:`commlayer.topologies.registry.candidates`):
an order-using algorithm (the ring) in the identity order and in the bandwidth-aware order
(:mod:`commlayer.adapt.ringorder`) for each chunk size, the others (recursive doubling) once;
each with every codec the policy admits. A policy then
picks one:

* ``exact``: the fastest exact configuration;
* ``error_budget``: the fastest whose measured relative error is <= ``error_budget``;
* ``hide``: the least lossy configuration whose predicted time fits in ``compute_s`` (the compute
  it can overlap with); if none fits, the fastest within the error budget;
* ``auto`` (``COMMLAYER_CODEC=auto``): prices each configuration's *time to equal progress*: its
  step (``step_s`` of compute plus the communication that ``compute_s`` of overlappable compute
  cannot hide) divided by ``delta = 1 - e^2``, where ``e`` is the codec's measured one-step
  relative error (a compressor with ``||C(x) - x||^2 <= (1 - delta) ||x||^2`` needs up to
  ``1/delta`` times the steps under error feedback: Stich & Karimireddy 2019). It takes the least
  lossy configuration within ``slack`` of the best. Exact has no error and ``delta = 1``, so it
  wins whenever compressing would not pay by more than ``slack``: on a fast link it is never
  slower than exact.

Ties (within 1e-9 s) break on a fixed order, so every rank picks the same candidate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from commlayer.adapt.cost import CodecProfile, CostParams, allreduce_time
from commlayer.adapt.estimator import LinkMatrixSnapshot
from commlayer.adapt.ringorder import best_ring_order, bottleneck
from commlayer.topologies import registry

MODES = ("exact", "error_budget", "hide", "auto")
DEFAULT_CODECS = ("fp16", "bf16", "int8", "qsgd:levels=127,bucket=512")


@dataclass(frozen=True)
class Policy:
    """What the controller optimises.

    Attributes:
        mode: "exact", "error_budget", "hide" or "auto".
        error_budget: largest relative error ||decode(encode(x)) - x|| / ||x|| allowed for lossy codecs.
        compute_s: seconds of compute the all-reduce can hide behind ("hide" and "auto" modes).
        codecs: codec specs considered when a lossy plan is allowed.
        step_s: compute seconds of one training step ("auto": the base of every candidate's step).
        slack: "auto": a candidate whose step is within this fraction of the fastest one is "as fast".
    """

    mode: str = "exact"
    error_budget: float = 0.0
    compute_s: float = 0.0
    codecs: tuple[str, ...] = DEFAULT_CODECS
    step_s: float = 0.0
    slack: float = 0.1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Expected policy mode in {MODES}, got {self.mode!r}")
        if self.error_budget < 0 or self.compute_s < 0 or self.step_s < 0 or self.slack < 0:
            raise ValueError(f"Expected error_budget, compute_s, step_s and slack >= 0, got {self.error_budget}, "
                             f"{self.compute_s}, {self.step_s}, {self.slack}")


@dataclass(frozen=True)
class Candidate:
    """One priced configuration."""

    algo: str
    order: tuple[int, ...] | None
    chunk_bytes: int
    codec: CodecProfile
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"algo": self.algo, "order": list(self.order) if self.order else None, "chunk_bytes": self.chunk_bytes,
                "codec": self.codec.spec, "predicted_s": self.seconds, "rel_error": self.codec.rel_error}

    def sort_key(self) -> tuple:
        return (round(self.seconds, 9), self.codec.rel_error, self.algo, self.chunk_bytes, self.order or (), self.codec.spec)


def candidates(s: LinkMatrixSnapshot, nbytes: int, codecs: Sequence[CodecProfile], chunks: Sequence[int],
               params: CostParams) -> list[Candidate]:
    """Every configuration with its predicted time."""
    p = s.size
    ident = tuple(range(p))
    orders = [ident]
    best = best_ring_order(s)
    if best != ident and bottleneck(s, best) > bottleneck(s, ident) * 1.0001:
        orders.append(best)
    block = max(1, nbytes // max(1, p))
    out = []
    for codec in codecs:
        wire_block = block * codec.ratio
        useful = _useful_chunks(chunks, wire_block)
        for algo in registry.candidates():
            if algo.uses_order:  # pipelined: every ring order and useful chunk size
                for order in orders:
                    for c in useful:
                        t = allreduce_time(s, nbytes, algo.name, order, c, params, codec)
                        out.append(Candidate(algo.name, None if order == ident else order, c, codec, t))
            elif codec.linear:  # whole-tensor messages: one configuration; only summable payloads (as always)
                out.append(Candidate(algo.name, None, max(useful), codec,
                                     allreduce_time(s, nbytes, algo.name, None, max(useful), params, codec)))
    return out


def _useful_chunks(chunks: Sequence[int], block: float) -> list[int]:
    """The chunk sizes that make different schedules for blocks of ``block`` bytes: every one below the block,
    the smallest at or above it (one message per block: "no pipelining"), and the smallest of all."""
    if not chunks:
        return [1 << 20]
    whole = [c for c in chunks if c >= block]
    return sorted({c for c in chunks if c < block} | ({min(whole)} if whole else set()) | {min(chunks)})


def choose(cands: Sequence[Candidate], policy: Policy, exact: bool) -> tuple[Candidate, str]:
    """The candidate ``policy`` prefers, and why."""
    if exact or policy.mode == "exact":
        pool = [c for c in cands if not c.codec.spec]
        best = min(pool, key=Candidate.sort_key)
        return best, _why("fastest exact", best, pool)
    pool = [c for c in cands if not c.codec.spec or c.codec.rel_error <= policy.error_budget]
    if policy.mode == "auto":
        pool = [c for c in pool if c.codec.rel_error < 1.0]

        def progress(c: Candidate) -> float:
            return time_to_progress(c, policy)

        fastest = min(progress(c) for c in pool)
        ok = [c for c in pool if progress(c) <= fastest * (1 + policy.slack) + 1e-9]
        best = min(ok, key=lambda c: (c.codec.rel_error, c.sort_key()))
        return best, _why(f"least error within {policy.slack:.0%} of the best time to equal progress "
                          f"({progress(best) * 1e3:.1f} ms/step-equivalent: {policy.step_s * 1e3:.1f} ms compute, "
                          f"{policy.compute_s * 1e3:.1f} ms of it overlappable, error {best.codec.rel_error:.3g}; "
                          f"budget {policy.error_budget:g})", best, pool)
    if policy.mode == "hide" and policy.compute_s > 0:
        fits = [c for c in pool if c.seconds <= policy.compute_s]
        if fits:
            best = min(fits, key=lambda c: (c.codec.rel_error, c.sort_key()))
            return best, _why(f"least error hidden behind {policy.compute_s * 1e3:.1f} ms compute", best, pool)
    best = min(pool, key=Candidate.sort_key)
    return best, _why(f"fastest within error budget {policy.error_budget:g}", best, pool)


def time_to_progress(c: Candidate, policy: Policy) -> float:
    """"auto" mode's price of a candidate: its step (compute plus unhidden communication) / (1 - error^2)."""
    return (policy.step_s + max(0.0, c.seconds - policy.compute_s)) / max(1e-9, 1.0 - c.codec.rel_error ** 2)


def _why(rule: str, best: Candidate, pool: Sequence[Candidate]) -> str:
    others = sorted((c for c in pool if c is not best), key=Candidate.sort_key)
    runner = f"; next {others[0].algo}/{others[0].codec.spec or 'exact'}/{others[0].chunk_bytes >> 10}K " \
             f"{others[0].seconds * 1e3:.1f} ms" if others else ""
    return (f"{rule}: {best.algo}/{best.codec.spec or 'exact'}/{best.chunk_bytes >> 10}K order={best.order or 'identity'} "
            f"predicted {best.seconds * 1e3:.1f} ms{runner}")


def window(s: LinkMatrixSnapshot, c: Candidate) -> int:
    """Chunks in flight that cover the ring's bandwidth-delay product (at least 1)."""
    if not registry.get(c.algo).uses_order:
        return 1
    order = c.order or tuple(range(s.size))
    links = [(order[k], order[(k + 1) % len(order)]) for k in range(len(order))]
    bdp = max(2 * s.alpha[a][b] * s.beta[a][b] for a, b in links)
    return max(1, math.ceil(bdp / max(1, c.chunk_bytes))) if math.isfinite(bdp) else 1
