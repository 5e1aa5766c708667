"""Bandwidth-aware ring order: a bottleneck-TSP heuristic over the measured link matrix.

A pipelined ring runs at the speed of its slowest directed link, so the order maximises the ring's
bottleneck bandwidth first and, among orders within ``tolerance`` of that, minimises the summed
latency. Up to :data:`EXACT_MAX` ranks every cyclic order is tried (rank 0 first, both directions,
since links are directed); beyond, a threshold search keeps only links at least as fast as a
candidate bottleneck and looks for a Hamiltonian cycle greedily, then improves it by 2-opt moves.
Deterministic: ties break on the lexicographically smallest order.
"""

from __future__ import annotations

import itertools
from typing import Sequence

from commlayer.adapt.estimator import LinkMatrixSnapshot

EXACT_MAX = 8


def _links(order: Sequence[int]) -> list[tuple[int, int]]:
    return [(order[k], order[(k + 1) % len(order)]) for k in range(len(order))]


def bottleneck(s: LinkMatrixSnapshot, order: Sequence[int]) -> float:
    """The ring's slowest link bandwidth (bytes/s)."""
    return min(s.beta[a][b] for a, b in _links(order))


def latency_sum(s: LinkMatrixSnapshot, order: Sequence[int]) -> float:
    return sum(s.alpha[a][b] for a, b in _links(order))


def _key(s: LinkMatrixSnapshot, order: Sequence[int], tolerance: float, best_bw: float) -> tuple:
    bw = bottleneck(s, order)
    return (0 if bw >= best_bw * (1 - tolerance) else 1, latency_sum(s, order), -bw, tuple(order))


def best_ring_order(s: LinkMatrixSnapshot, tolerance: float = 0.05) -> tuple[int, ...]:
    """The ring order (a permutation of range(p), starting at 0) with the best bottleneck bandwidth."""
    p = s.size
    if p <= 3 and all(s.beta[i][j] == s.beta[j][i] for i in range(p) for j in range(p)):
        return tuple(range(p))
    if p <= EXACT_MAX:
        cands: list[tuple[int, ...]] = [(0, *rest) for rest in itertools.permutations(range(1, p))]
    else:
        tours = [_threshold_tour(s, bw) for bw in sorted({s.beta[i][j] for i in range(p) for j in range(p) if i != j},
                                                         reverse=True)[: 4 * p]]
        cands = [_two_opt(s, c) for c in tours if c is not None] or [tuple(range(p))]
    best_bw = max(bottleneck(s, c) for c in cands)
    return tuple(min(cands, key=lambda c: _key(s, list(c), tolerance, best_bw)))


def _threshold_tour(s: LinkMatrixSnapshot, min_bw: float) -> tuple[int, ...] | None:
    """A Hamiltonian cycle using only links >= ``min_bw`` (greedy, fastest-next), or None."""
    p = s.size
    order, used = [0], {0}
    while len(order) < p:
        a = order[-1]
        nxt = [b for b in range(p) if b not in used and s.beta[a][b] >= min_bw]
        if not nxt:
            return None
        b = max(nxt, key=lambda b: (s.beta[a][b], -s.alpha[a][b], -b))
        order.append(b)
        used.add(b)
    return tuple(order) if s.beta[order[-1]][0] >= min_bw else None


def _two_opt(s: LinkMatrixSnapshot, order: tuple[int, ...], rounds: int = 4) -> tuple[int, ...]:
    best = list(order)
    p = len(best)
    for _ in range(rounds):
        improved = False
        for i in range(1, p - 1):
            for j in range(i + 1, p):
                cand = best[:i] + best[i:j + 1][::-1] + best[j + 1:]
                if (bottleneck(s, cand), -latency_sum(s, cand)) > (bottleneck(s, best), -latency_sum(s, best)):
                    best, improved = cand, True
        if not improved:
            break
    return tuple(best)
