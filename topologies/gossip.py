"""Gossip (decentralized) averaging: every rank mixes with its graph neighbours only.

One round on rank i:  ``x_i <- sum_j W_ij x_j`` over its in-neighbours and itself, with ``W`` from
:mod:`commlayer.topologies.graphs` (Metropolis-Hastings for undirected graphs, uniform weights when
they are doubly stochastic, push-sum for other directed graphs). Options:

* ``mode="sync"``: a round waits (up to ``round_timeout`` s) for this round's message of every
  in-neighbour; ``mode="async"``: a round never waits, it mixes with the latest value received
  from each neighbour (push-sum: with every share received so far, which conserves mass).
* a codec turns on CHOCO-gossip (Koloskova, Stich & Jaggi, ICML 2019): ranks exchange compressed
  differences ``q_i = C(x_i - x^_i)``, keep public copies ``x^_j`` and step
  ``x_i += gamma * sum_j W_ij (x^_j - x^_i)``.
* failures: a neighbour that the transport reports dead (or that shut down) leaves the neighbour
  set and the weights are recomputed over the live graph; a neighbour whose message misses the
  round timeout is skipped for that round (its weight stays on the rank itself).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from commlayer.codecs import Codec, CodecContext, from_frames, to_frames
from commlayer.codecs.base import acc_dtype as accumulator
from commlayer.topologies.base import Guarantee, Topology
from commlayer.topologies.comm import Group, frame_tensor, tensor_bytes, wire_dtype
from commlayer.topologies.graphs import Graph, contraction, make_graph
from commlayer.topologies.p2p import Inbox, buf, send_p2p
from commlayer.topologies.reduce_ops import ReduceOp
from commlayer.topologies.schedule import Step, fan
from commlayer.topologies.world_view import WorldView
from commlayer.transport.errors import CommError
from commlayer.transport.envelope import Message

logger = logging.getLogger(__name__)

TAG = 7
MODES = ("sync", "async")


def gossip_schedule(graph: Graph, t: int, nbytes: int, alive: "list[bool] | None" = None) -> Step:
    """What round ``t`` of plain or push-sum gossip sends: every live rank its whole tensor to each
    live out-neighbour, in ascending rank order (as :meth:`Gossip.mix_`)."""
    adj = graph.restrict(t, alive)
    rows = [i for i in range(graph.n) if adj[i].any()]
    outs = [[int(j) for j in np.flatnonzero(adj[i])] for i in rows]
    return fan(rows, outs, [[nbytes] * len(o) for o in outs])


@dataclass
class _KeyState:
    weight: float = 1.0                                               # push-sum weight
    last: dict[int, torch.Tensor] = field(default_factory=dict)       # async: latest value per neighbour
    hat: torch.Tensor | None = None                                   # CHOCO: own public copy
    hats: dict[int, torch.Tensor] = field(default_factory=dict)       # CHOCO: neighbours' public copies
    seen: dict[int, int] = field(default_factory=dict)                # CHOCO: latest round applied per neighbour


class Gossip(Topology):
    """Decentralized averaging over a graph (all ranks of the world).

    Args:
        graph: name in :data:`commlayer.topologies.graphs.GRAPHS`, adjacency matrix, or Graph.
        mixing: "auto", "metropolis", "uniform" or "push_sum".
        mode: "sync" or "async".
        rounds: gossip rounds per :meth:`allreduce` / :meth:`mix_` call (default 1).
        gamma: CHOCO consensus step size (with a codec).
        round_timeout: seconds a sync round waits for a neighbour before skipping it.
    """

    name = "gossip"

    def __init__(self, world: WorldView, group: Group, graph: Any = "ring", mixing: str = "auto", mode: str = "sync",
                 rounds: int = 1, gamma: float = 0.5, round_timeout: float = 30.0) -> None:
        super().__init__(world, group)
        if group.ranks != list(range(world.size)):
            raise ValueError("Expected gossip over every rank of the world")
        if mode not in MODES:
            raise ValueError(f"Expected mode in {MODES}, got {mode!r}")
        self.graph: Graph = make_graph(graph, self.size, world.seed)
        self.method = self.graph.mixing_method(mixing)
        if mode == "async" and self.graph.time_varying:
            raise ValueError("Expected a static graph for async gossip (ranks are at different rounds)")
        self.mode, self.rounds, self.gamma, self.round_timeout = mode, rounds, gamma, round_timeout
        self.round = 0
        self.skipped = 0  # neighbour messages that missed their round (late or dead)
        self._state: dict[str, _KeyState] = {}
        self._finished: set[str] = set()
        self.inbox = Inbox(world.transport, group.channel, TAG)
        world.on_failure(lambda _r: self.inbox.wake())

    # ---- weights ------------------------------------------------------------------------------
    def mixing_matrix(self, t: int, alive: list[bool] | None = None) -> np.ndarray:
        return self.graph.mixing(t, self.method, alive)

    def contraction_bound(self, rounds: int, start: int = 0) -> float:
        """Bound on ``||X_k - mean|| / ||X_0 - mean||`` (Frobenius over ranks) for ``rounds`` exact sync
        rounds from round ``start`` without failures (doubly stochastic mixing only)."""
        if self.method == "push_sum":
            raise ValueError("Expected doubly stochastic mixing: push-sum has no such bound")
        return contraction([self.mixing_matrix(start + t) for t in range(rounds)])

    def guarantee(self, codec: "str | Codec | None" = None) -> Guarantee:
        c = self.codec(codec)
        if self.mode == "async":
            return Guarantee(False, "async: ranks converge towards a common value near the mean; no per-round bound")
        if c is not None:
            return Guarantee(False, "CHOCO-gossip: mean over ranks preserved (up to float rounding); the consensus error "
                                    "contracts for a small enough gamma, at a rate set by the codec and the spectral gap")
        if self.method == "push_sum":
            return Guarantee(False, "push-sum: sum(x)/sum(w) preserved; the estimates converge geometrically to the mean")
        return Guarantee(False, "mean preserved; ||X_k - mean||_F <= contraction_bound(k) * ||X_0 - mean||_F "
                                "(= slem(W)^k for a static undirected graph)")

    # ---- API ----------------------------------------------------------------------------------
    def _allreduce(self, flat: torch.Tensor, op: ReduceOp, codec: Codec | None, rounds: int | None = None,
                   key: str | None = None) -> torch.Tensor:
        if op not in (ReduceOp.AVG, ReduceOp.SUM):
            raise ValueError(f"Expected op avg or sum for gossip, got {op.value}")
        if not flat.dtype.is_floating_point:
            raise TypeError(f"Expected a floating tensor for gossip, got {flat.dtype}")
        self._calls += 1
        key = key or f"call{self._calls}"
        for _ in range(self.rounds if rounds is None else rounds):
            self.mix_(flat, key, codec)
        self._state.pop(key, None)
        self._finished.add(key)
        if op == ReduceOp.SUM:
            flat.mul_(sum(self.world.alive()))
        return flat

    def mix_(self, x: torch.Tensor, key: str = "", codec: "str | Codec | None" = None) -> torch.Tensor:
        """One gossip round on the 1-D ``x`` in place (persistent per-``key`` state: push-sum weight, CHOCO copies)."""
        c = self.codec(codec)
        t = self.round
        self.round += 1
        alive = self.world.alive()
        adj = self.graph.restrict(t, alive)
        me = self.rank
        outs = [int(j) for j in np.flatnonzero(adj[me])]
        ins = [int(j) for j in np.flatnonzero(adj[:, me])]
        st = self._state.setdefault(key, _KeyState())
        if self._finished:
            self.inbox.discard(lambda m: m.header.meta.get("k") in self._finished)
        if self.mode == "sync":  # plain messages of earlier rounds are obsolete
            self.inbox.discard(lambda m: m.header.meta.get("r", 0) < t and not m.header.meta.get("c"))
        if self.method == "push_sum":
            if c is not None:
                raise ValueError("Expected no codec with push-sum mixing (CHOCO needs doubly stochastic weights)")
            self._push_sum(x, key, t, st, outs, ins)
        elif c is not None:
            if self.graph.time_varying:
                raise ValueError("Expected a static graph for CHOCO-gossip")
            self._choco(x, key, t, st, outs, ins, c, self.mixing_matrix(t, alive)[me])
        else:
            self._plain(x, key, t, st, outs, ins, self.mixing_matrix(t, alive)[me])
        return x

    # ---- rounds -------------------------------------------------------------------------------
    def _send(self, outs: list[int], t: int, key: str, frames: list, meta: dict, dtype: str = "", shape: tuple = ()) -> None:
        for j in outs:
            try:
                send_p2p(self.world.transport, j, self.group.channel, TAG, frames, {"r": t, "k": key, **meta}, dtype, shape)
            except CommError as exc:  # a neighbour that just died: the failure listener removes it next round
                logger.info("gossip: rank %d could not send round %d to rank %d: %s", self.rank, t, j, exc)

    def _wait(self, j: int, t: int, key: str) -> Message | None:
        m = self.inbox.take(lambda m: m.header.src == j and m.header.meta.get("r") == t and m.header.meta.get("k") == key,
                            self.round_timeout, give_up=lambda: j in self.world.dead)
        if m is None:
            self.skipped += 1
            logger.info("gossip: rank %d skipped rank %d in round %d (late or dead)", self.rank, j, t)
        return m

    def _latest(self, j: int, key: str) -> Message | None:
        ms = self.inbox.drain(lambda m: m.header.src == j and m.header.meta.get("k") == key)
        return max(ms, key=lambda m: m.header.meta["r"]) if ms else None

    def _tensor(self, m: Message, like: torch.Tensor) -> torch.Tensor:
        n = m.header.shape[0] if m.header.shape else 0
        if m.header.dtype != wire_dtype(like.dtype) or n != like.numel():
            raise CommError(f"gossip: rank {m.header.src} sent {n} x {m.header.dtype}, expected {like.numel()} x {like.dtype}; "
                            "every rank must gossip tensors of the same size and dtype in the same order")
        return frame_tensor(m.frames[0], like.dtype) if n else like.new_empty(0)

    def _plain(self, x: torch.Tensor, key: str, t: int, st: _KeyState, outs: list[int], ins: list[int], w: np.ndarray) -> None:
        snap = x.clone()
        self._send(outs, t, key, [tensor_bytes(snap)] if x.numel() else [], {}, wire_dtype(x.dtype), (x.numel(),))
        acc_dtype = accumulator(x.dtype)
        acc = snap.to(acc_dtype) * float(w[self.rank])
        for j in ins:
            if self.mode == "sync":
                m = self._wait(j, t, key)
                v = self._tensor(m, x) if m is not None else snap
            else:
                m = self._latest(j, key)
                if m is not None:
                    st.last[j] = self._tensor(m, x).clone()
                v = st.last.get(j, snap)
            acc += float(w[j]) * v.to(acc_dtype)
        x.copy_(acc)

    def _push_sum(self, x: torch.Tensor, key: str, t: int, st: _KeyState, outs: list[int], ins: list[int]) -> None:
        share = 1.0 / (len(outs) + 1)
        acc_dtype = accumulator(x.dtype)
        mass = x.to(acc_dtype) * (st.weight * share)
        wmass = st.weight * share
        snap = mass.to(x.dtype).contiguous()
        self._send(outs, t, key, [tensor_bytes(snap)] if x.numel() else [], {"w": wmass}, wire_dtype(x.dtype), (x.numel(),))
        acc, wacc = mass.clone(), wmass
        if self.mode == "sync":
            got = [self._wait(j, t, key) for j in ins]
        else:  # every share received so far, whatever its round: mass is conserved
            got = self.inbox.drain(lambda m: m.header.meta.get("k") == key)
        for m in got:
            if m is not None:
                acc += self._tensor(m, x).to(acc_dtype)
                wacc += float(m.header.meta["w"])
        st.weight = wacc
        x.copy_(acc / wacc)

    def _choco(self, x: torch.Tensor, key: str, t: int, st: _KeyState, outs: list[int], ins: list[int], codec: Codec,
               w: np.ndarray) -> None:
        n, seed = x.numel(), self.world.seed

        def ctx(src: int, r: int) -> CodecContext:
            return CodecContext((n,), x.dtype, f"choco/{key}/{src}", r, seed)

        if st.hat is None:
            st.hat = torch.zeros_like(x)
        enc = codec.encode(x - st.hat, ctx(self.rank, t))
        st.hat += codec.decode(enc, ctx(self.rank, t)).reshape(-1)
        header, buffers = to_frames(enc)
        self._send(outs, t, key, [header, *buffers], {"c": 1})
        # Copies are sums of every q received, so late messages of earlier rounds are applied too.
        for j in ins:
            # Sync: apply rounds <= t only, so every rank's copies describe the same round (mean preserved).
            msgs = self.inbox.drain(lambda m: m.header.src == j and m.header.meta.get("k") == key
                                    and (self.mode == "async" or m.header.meta.get("r", 0) <= t))
            latest = max([st.seen.get(j, -1), *(int(m.header.meta["r"]) for m in msgs)])
            if self.mode == "sync" and latest < t:  # a message of a later round may already have been applied
                m = self._wait(j, t, key)
                if m is not None:
                    msgs.append(m)
            hat = st.hats.setdefault(j, torch.zeros_like(x))
            for m in msgs:
                frames = [buf(f) for f in m.frames]
                hat += codec.decode(from_frames(frames[0], frames[1:]), ctx(j, int(m.header.meta["r"]))).reshape(-1)
                st.seen[j] = max(st.seen.get(j, -1), int(m.header.meta["r"]))
        step = torch.zeros_like(x)
        for j in ins:
            step += float(w[j]) * (st.hats[j] - st.hat)
        x.add_(step, alpha=self.gamma)

    def close(self) -> None:
        self.inbox.close()
