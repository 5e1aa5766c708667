"""Training rounds of one configuration: compute, codec, the algorithm's schedule, churn, sync period.

A round on node i: compute (``compute_s / speed_i``), encode, the communication step (every
``period`` rounds: local SGD / DiLoCo with period H), decode. The communication step replays the
algorithm's own schedule (:mod:`commlayer.topologies.schedule`) over the live nodes:

* ``ring``, ``tree``, ``chain``, ``ps`` (sync, sharded over ``ps_servers``): the registry's schedules;
  a linear codec shrinks the payload to its wire size, any other codec is all-gathered the way the
  algorithm declares (``gather``: ring or direct) and every node decodes ``p`` payloads;
* ``gossip[:graph]``: one round of the graph (every graph of :mod:`commlayer.topologies.graphs`);
* ``ps-async``: bounded-staleness asynchronous PS (each worker push/pulls on its own clock, at most
  ``staleness`` rounds ahead of the slowest); reports the staleness the server saw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from commlayer.adapt.cost import EXACT, CodecProfile
from commlayer.sim.churn import Churn
from commlayer.sim.engine import Engine
from commlayer.topologies import registry
from commlayer.topologies.codec_allreduce import allgather_schedule
from commlayer.topologies.gossip import gossip_schedule
from commlayer.topologies.graphs import GRAPHS, make_graph
from commlayer.topologies.ps_collective import ps_schedule
from commlayer.topologies.schedule import Step

TOPOLOGIES = ("ring", "tree", "chain", "ps", "ps-async", "gossip")


@dataclass(frozen=True)
class Scenario:
    """One configuration to simulate.

    Attributes:
        topology: one of :data:`TOPOLOGIES`, ``gossip:GRAPH`` for a graph other than the ring.
        nbytes: model/gradient bytes per node (float32).
        codec: measured or given codec profile.
        rounds: training rounds.
        compute_s: compute seconds per round on a speed-1 device.
        period: communicate every ``period`` rounds (local SGD / DiLoCo H).
        chunk_bytes: ring/chain chunk size.
        ps_servers: PS shards (co-located on nodes 0..S-1).
        staleness: ps-async bound.
    """

    topology: str
    nbytes: int
    codec: CodecProfile = EXACT
    rounds: int = 10
    compute_s: float = 0.0
    period: int = 1
    chunk_bytes: int = 1 << 20
    ps_servers: int = 1
    staleness: int = 2

    @property
    def base(self) -> str:
        return self.topology.split(":", 1)[0]

    @property
    def graph(self) -> str:
        return self.topology.split(":", 1)[1] if ":" in self.topology else "ring"

    def check(self) -> "Scenario":
        if self.base not in TOPOLOGIES:
            raise ValueError(f"topology: expected one of {TOPOLOGIES} (gossip:GRAPH with GRAPH in {GRAPHS}), got {self.topology!r}")
        if self.base == "gossip" and self.graph not in GRAPHS:
            raise ValueError(f"topology {self.topology!r}: expected a graph in {GRAPHS}, got {self.graph!r}")
        if self.nbytes < 4 or self.rounds < 1 or self.period < 1 or self.compute_s < 0:
            raise ValueError(f"Expected nbytes >= 4, rounds >= 1, period >= 1, compute_s >= 0, got {self}")
        return self


@dataclass(frozen=True)
class RoundsResult:
    """Per-round outcome: ``end[r]`` when the slowest live node finished round r (s)."""

    end: np.ndarray
    comm_rounds: int
    sent_per_node: np.ndarray
    energy_per_node: np.ndarray
    alive_frac: float
    staleness_mean: float = 0.0
    staleness_max: float = 0.0


def collective_steps(sc: Scenario, p: int, order: list[int] | None = None) -> tuple[Iterable[Step], float]:
    """Steps of one compressed or exact all-reduce over ``p`` ranks, and the receivers' reduction scale."""
    c = sc.codec
    wire = max(4, int(math.ceil(sc.nbytes * c.ratio / 4)) * 4)
    if sc.base == "ps":
        if c.linear:
            return ps_schedule(p, wire // 4, 4, min(p, sc.ps_servers)), c.elem_scale / max(c.ratio, 1e-9)
        algo = registry.get("ps")
    else:
        algo = registry.get(sc.base)
        assert algo.schedule is not None
        if c.linear:
            return algo.schedule(p, wire // 4, 4, order, sc.chunk_bytes), c.elem_scale / max(c.ratio, 1e-9)
    return allgather_schedule(p, wire, algo.gather, order), 1.0


def simulate_rounds(engine: Engine, sc: Scenario, speeds: np.ndarray, churn: Churn | None = None) -> RoundsResult:
    """Runs ``sc.rounds`` rounds on ``engine``'s world; see the module docstring."""
    sc.check()
    n = engine.links.n
    if sc.base == "ps-async":
        return _ps_async(engine, sc, speeds)
    comp = sc.compute_s / speeds
    c = sc.codec
    enc, dec = sc.nbytes / c.encode_Bps, sc.nbytes / c.decode_Bps
    t = np.zeros(n)
    ends, alive_sum, comm = [], 0.0, 0
    graph = make_graph(sc.graph, n) if sc.base == "gossip" else None
    gwire = max(4, int(math.ceil(sc.nbytes * c.ratio)))
    for r in range(sc.rounds):
        alive = churn.step(r) if churn is not None else np.ones(n, dtype=bool)
        alive_sum += alive.mean()
        nodes = np.flatnonzero(alive)
        t = t + np.where(alive, comp, 0.0)
        engine.links.at(float(t.max()))
        if (r + 1) % sc.period == 0 and nodes.size > 1:
            comm += 1
            start = t + np.where(alive, enc, 0.0)
            if graph is not None:
                steps: Iterable[Step] = [gossip_schedule(graph, r, gwire, alive.tolist())]
                scale, mapped, p = 1.0, None, n
            else:
                p = nodes.size
                steps, scale = collective_steps(sc, p)
                mapped = nodes
            done = engine.run(steps, start, mapped, elem_scale=scale)
            ndec = 1 if (c.linear or graph is not None) else p
            t = np.where(alive, done + ndec * dec, t)
        ends.append(float(t[alive].max()) if alive.any() else float(t.max()))
    rounds = sc.rounds
    return RoundsResult(np.array(ends), comm, engine.sent / rounds, engine.energy / rounds, alive_sum / rounds)


def _ps_async(engine: Engine, sc: Scenario, speeds: np.ndarray) -> RoundsResult:
    """Bounded-staleness async PS: worker w's round r may start once every worker finished round r - staleness - 1."""
    n = engine.links.n
    servers = max(1, min(n, sc.ps_servers))
    c = sc.codec
    wire = max(4, int(math.ceil(sc.nbytes * c.ratio / 4)) * 4)
    push, pull = ps_schedule(n, wire // 4, 4, servers)
    comp = sc.compute_s / speeds
    fin = np.zeros((sc.rounds, n))
    applied: list[np.ndarray] = []   # when the server applied each worker's push, per round
    read = np.zeros(n)               # when each worker last read the model
    stale = []
    t = np.zeros(n)
    for r in range(sc.rounds):
        gate = fin[r - sc.staleness - 1].max() if r > sc.staleness else 0.0
        start = np.maximum(t, gate) + comp + sc.nbytes / c.encode_Bps
        pdone = engine.transfer(push, start[push.src][:, None] * np.ones(push.dst.shape))
        pm = push.mask if push.mask is not None else np.ones(push.dst.shape, dtype=bool)
        at_server = np.where(pm, pdone, -math.inf).max(axis=1)      # (n,) the last shard of each worker applied
        at_server = np.where(np.isinf(at_server), start, at_server)  # a lone server "pushes" to itself
        applied.append(at_server)
        # pull: each server sends worker w its shard as soon as w's push is applied
        ready = np.broadcast_to(at_server[pull.dst], pull.dst.shape).copy()
        qdone = engine.transfer(pull, ready)
        got = np.full(n, -math.inf)
        qm = pull.mask if pull.mask is not None else np.ones(pull.dst.shape, dtype=bool)
        np.maximum.at(got, pull.dst[qm], qdone[qm])
        t = np.maximum(np.where(np.isinf(got), at_server, got), at_server) + sc.nbytes / c.decode_Bps
        fin[r] = t
        allp = np.sort(np.concatenate(applied))  # updates applied between this worker's read and its push
        stale.append(np.searchsorted(allp, at_server, "left") - np.searchsorted(allp, read, "right"))
        read = t
    s = np.concatenate(stale) if stale else np.zeros(1)
    return RoundsResult(fin.max(axis=1), sc.rounds, engine.sent / sc.rounds, engine.energy / sc.rounds, 1.0,
                        float(s.mean()), float(s.max()))
