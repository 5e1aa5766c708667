"""``COMMLAYER_CODEC=auto``'s choice (``policy.choose``) against a brute-force evaluation of the cost model.

The reference prices every (algorithm, ring chunk, codec) with :func:`commlayer.adapt.cost.allreduce_time` directly
and applies the documented rule by hand: time to equal progress = (compute + unhidden communication) times the
codec's step penalty 1 / (1 - e^2), then the least error within ``slack`` of the best. No processes, deterministic.
"""

from __future__ import annotations

import pytest

from commlayer.adapt import policy as pol
from commlayer.adapt.cost import EXACT, CodecProfile, CostParams, allreduce_time
from commlayer.adapt.estimator import LinkMatrixSnapshot

MB = 1e6 / 8  # bytes/s per Mbit/s
P = CostParams()
CHUNKS = (64 << 10, 256 << 10, 1 << 20, 4 << 20)
NBYTES = 5_292_072  # the demo task's one DDP bucket
# As measured on that bucket (benchmarks/adaptive_training.py, rank 0): ratio, error; codec speeds 1 GB/s.
FP16 = CodecProfile("fp16", 0.5, 1e9, 1e9, 3e-4, True)
INT8 = CodecProfile("int8+ef", 0.26, 1e9, 1e9, 0.008, False)
TOPK = CodecProfile("topk:ratio=0.01+ef", 0.0166, 1e9, 1e9, 0.752, False)
TOPK3 = CodecProfile("topk:ratio=0.001+ef", 0.00166, 1e9, 1e9, 0.862, False)
PROFILES = [EXACT, FP16, INT8, TOPK, TOPK3]


def _brute_force(s: LinkMatrixSnapshot, policy: pol.Policy) -> tuple[str, float]:
    """(codec, time to equal progress) of the documented rule, by enumeration."""
    priced = []
    for codec in PROFILES:
        if codec.spec and (codec.rel_error > policy.error_budget or codec.rel_error >= 1.0):
            continue
        times = [allreduce_time(s, NBYTES, "ring", None, c, P, codec) for c in CHUNKS]
        if codec.linear:
            times.append(allreduce_time(s, NBYTES, "tree", None, max(CHUNKS), P, codec))
        t = min(times)
        progress = (policy.step_s + max(0.0, t - policy.compute_s)) / (1.0 - codec.rel_error ** 2)
        priced.append((progress, codec.rel_error, t, codec.spec))
    best = min(p for p, _, _, _ in priced)
    ok = [(e, t, spec, p) for p, e, t, spec in priced if p <= best * (1 + policy.slack) + 1e-9]
    _, _, spec, p = min(ok)  # least error, then fastest
    return spec, p


@pytest.mark.parametrize("mbit", [1000.0, 100.0, 20.0, 5.0, 2.0, 0.5])
@pytest.mark.parametrize("step_s", [0.05, 0.3, 2.0])
def test_auto_choice_equals_brute_force(mbit: float, step_s: float) -> None:
    s = LinkMatrixSnapshot.uniform(4, 0.025, mbit * MB)
    policy = pol.Policy("auto", 0.9, 0.0, step_s=step_s)
    cands = pol.candidates(s, NBYTES, PROFILES, CHUNKS, P)
    best, why = pol.choose(cands, policy, exact=False)
    spec, progress = _brute_force(s, policy)
    assert best.codec.spec == spec, why
    assert pol.time_to_progress(best, policy) == pytest.approx(progress, rel=1e-6)


def test_fast_link_stays_exact_slow_link_compresses() -> None:
    fast = pol.choose(pol.candidates(LinkMatrixSnapshot.uniform(4, 1e-4, 10_000 * MB), NBYTES, PROFILES, CHUNKS, P),
                      pol.Policy("auto", 0.9, 0.0, step_s=0.3), exact=False)[0]
    assert fast.codec.spec == ""
    slow = pol.choose(pol.candidates(LinkMatrixSnapshot.uniform(4, 0.025, 20 * MB), NBYTES, PROFILES, CHUNKS, P),
                      pol.Policy("auto", 0.9, 0.0, step_s=0.3), exact=False)[0]
    assert slow.codec.spec != ""
