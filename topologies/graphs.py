"""Communication graphs and mixing matrices for gossip (numpy only, no communication).

A :class:`Graph` gives, for every round ``t``, a boolean adjacency ``A`` with ``A[i, j]`` true when
node ``i`` sends to node ``j`` (no self loops). Mixing matrices are row-oriented:
``x_i <- sum_j W[i, j] x_j``.

* undirected graphs: Metropolis-Hastings weights ``W_ij = 1 / (1 + max(d_i, d_j))`` (Xiao & Boyd,
  "Fast linear iterations for distributed averaging", 2004), symmetric and doubly stochastic;
* directed graphs whose uniform weights ``1 / (in-degree + 1)`` are doubly stochastic (the
  exponential graphs of Ying et al., "Exponential Graph is Provably Efficient for Decentralized
  Deep Training", NeurIPS 2021): those uniform weights;
* any other directed graph: push-sum (Kempe, Dobra & Gehrke, FOCS 2003), column-stochastic shares
  ``1 / (out-degree + 1)`` plus a weight that de-biases the estimate.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

GRAPHS = ("ring", "torus", "exponential", "one_peer_exponential", "random_matching", "complete")
MIXINGS = ("auto", "metropolis", "uniform", "push_sum")


class Graph:
    """A static or time-varying communication graph over ``n`` nodes.

    Args:
        n: number of nodes.
        adjacency: static boolean ``n x n`` matrix (``A[i, j]``: i sends to j), or
        fn: ``fn(t) -> adjacency`` for a time-varying graph.
        name: label.
    """

    def __init__(self, n: int, adjacency: np.ndarray | None = None, fn: Callable[[int], np.ndarray] | None = None,
                 name: str = "custom") -> None:
        if (adjacency is None) == (fn is None):
            raise ValueError("Expected exactly one of adjacency or fn")
        self.n = int(n)
        self.name = name
        self._fn = fn
        self._static = None if adjacency is None else _check_adj(np.asarray(adjacency), n)

    @property
    def time_varying(self) -> bool:
        return self._fn is not None

    def adjacency(self, t: int = 0) -> np.ndarray:
        if self._static is not None:
            return self._static
        return _check_adj(np.asarray(self._fn(t)), self.n)  # type: ignore[misc]

    def directed(self, t: int = 0) -> bool:
        a = self.adjacency(t)
        return not np.array_equal(a, a.T)

    def out_neighbors(self, i: int, t: int = 0) -> list[int]:
        return [int(j) for j in np.flatnonzero(self.adjacency(t)[i])]

    def in_neighbors(self, i: int, t: int = 0) -> list[int]:
        return [int(j) for j in np.flatnonzero(self.adjacency(t)[:, i])]

    def restrict(self, t: int, alive: Sequence[bool] | None) -> np.ndarray:
        """Adjacency of round ``t`` without the edges of dead nodes."""
        a = self.adjacency(t).copy()
        if alive is not None:
            dead = ~np.asarray(alive, dtype=bool)
            a[dead, :] = False
            a[:, dead] = False
        return a

    def mixing_method(self, method: str = "auto", t: int = 0) -> str:
        """Resolves "auto": metropolis if undirected, uniform if that is doubly stochastic, else push_sum."""
        if method not in MIXINGS:
            raise ValueError(f"Expected mixing in {MIXINGS}, got {method!r}")
        if method != "auto":
            return method
        a = self.adjacency(t)
        if np.array_equal(a, a.T):
            return "metropolis"
        return "uniform" if is_doubly_stochastic(uniform_weights(a)) else "push_sum"

    def mixing(self, t: int = 0, method: str = "auto", alive: Sequence[bool] | None = None) -> np.ndarray:
        """Mixing matrix of round ``t`` (row i: weights node i applies). Dead nodes keep only themselves."""
        method = self.mixing_method(method, t)
        a = self.restrict(t, alive)
        if method == "metropolis":
            return metropolis_weights(a)
        if method == "uniform":
            return uniform_weights(a)
        return push_sum_weights(a)

    def __repr__(self) -> str:
        return f"Graph({self.name!r}, n={self.n}{', time-varying' if self.time_varying else ''})"


def _check_adj(a: np.ndarray, n: int) -> np.ndarray:
    if a.shape != (n, n):
        raise ValueError(f"Expected an adjacency of shape ({n}, {n}), got {a.shape}")
    a = a.astype(bool).copy()
    np.fill_diagonal(a, False)
    return a


# ---- graphs -------------------------------------------------------------------------------------
def ring(n: int) -> Graph:
    a = np.zeros((n, n), dtype=bool)
    for i in range(n):
        if n > 1:
            a[i, (i + 1) % n] = a[(i + 1) % n, i] = True
    return Graph(n, a, name="ring")


def torus_shape(n: int) -> tuple[int, int]:
    """The most square rows x cols = n factorization (rows <= cols)."""
    r = int(math.isqrt(n))
    while n % r:
        r -= 1
    return r, n // r


def torus(n: int, rows: int | None = None) -> Graph:
    """2-D torus: node (r, c) talks to its four wrap-around neighbours."""
    r, c = (rows, n // rows) if rows else torus_shape(n)
    if r * c != n:
        raise ValueError(f"Expected rows dividing n={n}, got {rows}")
    a = np.zeros((n, n), dtype=bool)
    for i in range(n):
        y, x = divmod(i, c)
        for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            j = ((y + dy) % r) * c + (x + dx) % c
            if j != i:
                a[i, j] = a[j, i] = True
    return Graph(n, a, name="torus")


def _tau(n: int) -> int:
    return max(1, (n - 1).bit_length()) if n > 1 else 1


def exponential(n: int) -> Graph:
    """Static exponential graph: i sends to i + 2^k (mod n), k = 0 .. ceil(log2 n) - 1."""
    a = np.zeros((n, n), dtype=bool)
    for i in range(n):
        for k in range(_tau(n)):
            if (1 << k) < n:
                a[i, (i + (1 << k)) % n] = True
    return Graph(n, a, name="exponential")


def one_peer_exponential(n: int) -> Graph:
    """Time-varying one-peer exponential graph: in round t, i sends to i + 2^(t mod tau) only.

    With n a power of two, tau = log2 n consecutive rounds average exactly (Ying et al. 2021).
    """
    tau = _tau(n)

    def fn(t: int) -> np.ndarray:
        a = np.zeros((n, n), dtype=bool)
        if n > 1:
            s = 1 << (t % tau)
            for i in range(n):
                a[i, (i + s) % n] = True
        return a

    return Graph(n, fn=fn, name="one_peer_exponential")


def random_matching(n: int, seed: int = 0) -> Graph:
    """Time-varying random perfect matching (one node idles when n is odd); same on every rank."""

    def fn(t: int) -> np.ndarray:
        rng = np.random.Generator(np.random.PCG64([seed, t]))
        perm = rng.permutation(n)
        a = np.zeros((n, n), dtype=bool)
        for k in range(0, n - 1, 2):
            i, j = perm[k], perm[k + 1]
            a[i, j] = a[j, i] = True
        return a

    return Graph(n, fn=fn, name="random_matching")


def complete(n: int) -> Graph:
    return Graph(n, ~np.eye(n, dtype=bool), name="complete")


def from_adjacency(adjacency: np.ndarray | Sequence[Sequence[int]]) -> Graph:
    a = np.asarray(adjacency)
    return Graph(a.shape[0], a, name="custom")


def make_graph(graph: "str | Graph | np.ndarray", n: int, seed: int = 0) -> Graph:
    """A graph by name (:data:`GRAPHS`), adjacency matrix or :class:`Graph`, checked against ``n`` nodes."""
    if isinstance(graph, Graph):
        g = graph
    elif isinstance(graph, str):
        makers = {"ring": ring, "torus": torus, "exponential": exponential, "one_peer_exponential": one_peer_exponential,
                  "complete": complete, "random_matching": lambda m: random_matching(m, seed)}
        if graph not in makers:
            raise ValueError(f"Expected a graph in {GRAPHS}, an adjacency matrix or a Graph, got {graph!r}")
        g = makers[graph](n)
    else:
        g = from_adjacency(graph)
    if g.n != n:
        raise ValueError(f"Expected a graph over {n} nodes, got {g.n}")
    return g


# ---- weights ------------------------------------------------------------------------------------
def metropolis_weights(a: np.ndarray) -> np.ndarray:
    """Metropolis-Hastings weights of an undirected adjacency (symmetric, doubly stochastic)."""
    if not np.array_equal(a, a.T):
        raise ValueError("Metropolis-Hastings weights need an undirected (symmetric) graph; use push_sum for directed ones")
    n = a.shape[0]
    d = a.sum(axis=1)
    w = np.zeros((n, n))
    ii, jj = np.nonzero(a)
    w[ii, jj] = 1.0 / (1.0 + np.maximum(d[ii], d[jj]))
    w[np.arange(n), np.arange(n)] = 1.0 - w.sum(axis=1)
    return w


def uniform_weights(a: np.ndarray) -> np.ndarray:
    """Row-stochastic ``1 / (in-degree + 1)`` over in-neighbours and self."""
    n = a.shape[0]
    w = (a.T | np.eye(n, dtype=bool)).astype(float)
    return w / w.sum(axis=1, keepdims=True)


def push_sum_weights(a: np.ndarray) -> np.ndarray:
    """Column-stochastic push-sum matrix: node j sends share ``1 / (out-degree_j + 1)`` to each out-neighbour and itself."""
    n = a.shape[0]
    send = (a | np.eye(n, dtype=bool)).astype(float)
    send /= send.sum(axis=1, keepdims=True)
    return send.T


def is_doubly_stochastic(w: np.ndarray, tol: float = 1e-12) -> bool:
    return bool(np.allclose(w.sum(axis=0), 1.0, atol=tol) and np.allclose(w.sum(axis=1), 1.0, atol=tol))


def slem(w: np.ndarray) -> float:
    """Second largest eigenvalue modulus of a doubly stochastic W (largest |eig| of W - 11^T/n)."""
    n = w.shape[0]
    if n == 1:
        return 0.0
    m = w - np.full((n, n), 1.0 / n)
    eig = np.linalg.eigvalsh(m) if np.allclose(m, m.T) else np.linalg.eigvals(m)
    return float(np.max(np.abs(eig)))


def contraction(ws: Sequence[np.ndarray]) -> float:
    """``|| W_{k-1} ... W_0 - 11^T/n ||_2``: bounds ``||X_k - mean|| / ||X_0 - mean||`` (Frobenius, stacked ranks)
    for doubly stochastic W_t; for a symmetric static W it equals ``slem(W) ** k``."""
    n = ws[0].shape[0] if ws else 1
    prod = np.eye(n)
    for w in ws:
        prod = w @ prod
    return float(np.linalg.norm(prod - np.full((n, n), 1.0 / n), 2)) if ws else 1.0
