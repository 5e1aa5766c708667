"""A small numpy model trained inside the simulation, so time-to-accuracy can be projected.

Least-squares regression ``y = X w* + noise`` with ``d`` features, ``m`` samples per node and
non-identical node data (each node's features are shifted, so local optima differ). Each round
every node takes an SGD step on its own data, then the parameters are combined the way the
topology combines them: the exact mean (ring, tree, chain, ps), one gossip mixing step with the
graph's matrices, nothing between local-SGD sync points (period H). A lossy codec perturbs the
exchanged update by its measured relative error (error feedback is not modelled). Loss is the
mean squared error on all nodes' data at the nodes' mean parameters (gossip: mean over nodes of
each node's own parameters).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from commlayer.topologies.graphs import make_graph


@dataclass(frozen=True)
class TrainConfig:
    """The model: ``d`` features, ``m`` samples per node, SGD step ``lr``, target loss ``target`` x optimum."""

    d: int = 16
    m: int = 32
    lr: float = 0.05
    target: float = 1.5
    noise: float = 0.1
    seed: int = 0


def rounds_to_target(topology: str, n: int, rounds: int, period: int = 1, rel_error: float = 0.0,
                     cfg: TrainConfig = TrainConfig()) -> tuple[int | None, list[float]]:
    """(first round whose loss <= ``cfg.target`` x the optimal loss, or None; loss per round)."""
    rng = np.random.Generator(np.random.PCG64(cfg.seed))
    w_star = rng.standard_normal(cfg.d)
    shift = rng.standard_normal((n, 1, cfg.d)) * 0.5
    xs = rng.standard_normal((n, cfg.m, cfg.d)) + shift
    ys = xs @ w_star + cfg.noise * rng.standard_normal((n, cfg.m))
    flat_x, flat_y = xs.reshape(-1, cfg.d), ys.reshape(-1)
    opt = np.linalg.lstsq(flat_x, flat_y, rcond=None)[0]
    best = float(np.mean((flat_x @ opt - flat_y) ** 2))
    base = topology.split(":", 1)[0]
    graph = make_graph(topology.split(":", 1)[1] if ":" in topology else "ring", n) if base == "gossip" else None
    theta = np.zeros((n, cfg.d))
    losses: list[float] = []
    hit = None
    for r in range(rounds):
        grad = np.einsum("nmd,nm->nd", xs, np.einsum("nmd,nd->nm", xs, theta) - ys) * (2.0 / cfg.m)
        new = theta - cfg.lr * grad
        if (r + 1) % period == 0:
            delta = new - theta
            if rel_error > 0:
                scale = rel_error * np.linalg.norm(delta, axis=1, keepdims=True) / np.sqrt(cfg.d)
                delta = delta + scale * rng.standard_normal(delta.shape)
            new = theta + delta
            if graph is not None:
                w = graph.mixing(r)
                if graph.mixing_method() == "push_sum":
                    raise ValueError(f"{topology}: the training model needs doubly stochastic mixing, got push-sum")
                new = w @ new
            else:
                new = np.repeat(new.mean(axis=0, keepdims=True), n, axis=0)
        theta = new
        if graph is not None:
            loss = float(np.mean([np.mean((flat_x @ theta[i] - flat_y) ** 2) for i in range(0, n, max(1, n // 64))]))
        else:
            loss = float(np.mean((flat_x @ theta.mean(axis=0) - flat_y) ** 2))
        losses.append(loss)
        if hit is None and loss <= cfg.target * best:
            hit = r
    return hit, losses
