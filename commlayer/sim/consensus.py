"""Convergence where it is cheap to be exact: gossip consensus error per round.

Two independent answers from the same mixing matrices (:meth:`commlayer.topologies.graphs.Graph.mixing`,
the ones :class:`~commlayer.topologies.gossip.Gossip` applies):

* **averaging**: the numpy simulation ``X_{k+1} = W_k X_k`` of what the ranks do, reporting
  ``||X_k - mean||_F / ||X_0 - mean||_F`` (push-sum: the de-biased estimates ``x / w``);
* **spectral**: ``slem(W)^k`` for a static doubly stochastic W (the rate the averaging must not beat),
  from the eigenvalues (n <= 1024) or a power iteration on ``W - 11^T/n``.
"""

from __future__ import annotations

import numpy as np

from commlayer.topologies.graphs import make_graph, slem


def _slem_power(w: np.ndarray, iters: int = 300, seed: int = 0) -> float:
    n = w.shape[0]
    v = np.asarray(np.random.Generator(np.random.PCG64(seed)).standard_normal(n), dtype=float)
    lam = 0.0
    for _ in range(iters):
        v -= v.mean()
        u = w @ v
        u -= u.mean()
        nv = float(np.linalg.norm(u))
        if nv == 0:
            return 0.0
        lam = nv / float(np.linalg.norm(v))
        v = u / nv
    return float(lam)


def consensus_curve(graph: str, n: int, rounds: int, mixing: str = "auto", seed: int = 0,
                    alive: "list[np.ndarray] | None" = None, x0: np.ndarray | None = None) -> dict[str, list[float] | float | str]:
    """Consensus error after each of ``rounds`` gossip rounds on ``graph`` over ``n`` nodes.

    ``x0`` (n, d): the nodes' starting vectors (default: one standard normal each, seeded).

    Returns:
        ``{"averaging": [...], "spectral": [...] (static doubly stochastic graphs only), "slem": float, "method": str}``
    """
    g = make_graph(graph, n, seed)
    method = g.mixing_method(mixing)
    rng = np.random.Generator(np.random.PCG64(seed + 1))
    x = rng.standard_normal((n, 1)) if x0 is None else np.asarray(x0, dtype=float)
    wsum = np.ones((n, 1))
    mean = x.mean(axis=0)
    e0 = float(np.linalg.norm(x - mean))
    out: list[float] = []
    for t in range(rounds):
        w = g.mixing(t, method, None if alive is None else alive[t].tolist())
        x = w @ x
        if method == "push_sum":
            wsum = w @ wsum
            est = x / wsum
        else:
            est = x
        out.append(float(np.linalg.norm(est - mean)) / e0)
    res: dict[str, list[float] | float | str] = {"averaging": out, "method": method}
    if not g.time_varying and method != "push_sum":
        w = g.mixing(0, method)
        lam = slem(w) if n <= 1024 else _slem_power(w)
        res["slem"] = lam
        res["spectral"] = [lam ** (k + 1) for k in range(rounds)]
    return res
