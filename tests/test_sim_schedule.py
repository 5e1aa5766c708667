"""Every algorithm's schedule (what the simulator replays) is what the real code sends over real sockets.

Each rank records its sends with a transport send observer while the algorithm runs, then the
per-rank sequence of (destination, bytes) is compared with the algorithm's own schedule function.
Results are also checked against a numpy reference, so a schedule cannot match a broken run.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

from commlayer.topologies import registry
from commlayer.topologies.gossip import gossip_schedule
from commlayer.topologies.graphs import make_graph
from commlayer.topologies.linear import barrier_schedule
from commlayer.topologies.schedule import sends_by_rank
from multiproc import run_world

NUMEL, CHUNK = 1001, 1024   # uneven blocks, several ragged chunks per block
GRAPHS = ("ring", "exponential", "random_matching", "one_peer_exponential")
GOSSIP_ROUNDS = 3


def _record(rank: int, world: int, ps_servers: int) -> dict[str, Any]:
    os.environ["COMMLAYER_PS_SERVERS"] = str(ps_servers)
    import torch

    from commlayer.topologies import World
    from commlayer.topologies.reduce_ops import ReduceOp

    w = World(rank, world, "127.0.0.1", int(os.environ["MASTER_PORT"]), timeout=60)
    sent: list[tuple[int, int]] = []

    def on_send(peer: int, nbytes: int, _s: float) -> None:
        sent.append((peer, nbytes))

    out: dict[str, Any] = {}
    try:
        group = w.group("sched")
        for name in registry.names():
            x = torch.arange(NUMEL, dtype=torch.float32) * (rank + 1)
            w.barrier()
            sent.clear()
            w.transport.add_observer(on_send=on_send)
            registry.get(name).run(group.op("allreduce"), x, ReduceOp.SUM, [3, 1, 0, 2][:world] if world == 4 else None, CHUNK)
            w.transport.remove_observer(on_send=on_send)
            out[name] = {"sent": list(sent), "result": x.numpy().tolist()}
        w.barrier()
        sent.clear()
        w.transport.add_observer(on_send=on_send)
        w.barrier()
        w.transport.remove_observer(on_send=on_send)
        out["barrier"] = {"sent": list(sent)}
        for graph in GRAPHS:
            g = w.gossip(graph)
            x = torch.full((NUMEL,), float(rank))
            w.barrier()
            sent.clear()
            w.transport.add_observer(on_send=on_send)
            for _ in range(GOSSIP_ROUNDS):
                g.mix_(x, key=graph)
            w.transport.remove_observer(on_send=on_send)
            out["gossip:" + graph] = {"sent": list(sent), "result": x.numpy().tolist()}
            w.barrier()
            g.close()
    finally:
        w.close()
    return out


@pytest.mark.parametrize("world,ps_servers", [(4, 2), (3, 1)])
def test_real_sends_match_each_algorithms_schedule(world: int, ps_servers: int) -> None:
    got = run_world(_record, world, ps_servers, timeout=200, env={"COMMLAYER_PS_SERVERS": str(ps_servers)})
    os.environ["COMMLAYER_PS_SERVERS"] = str(ps_servers)
    try:
        expect = {}
        for name in registry.names():
            algo = registry.get(name)
            assert algo.schedule is not None, f"algorithm {name} has no schedule"
            order = [3, 1, 0, 2] if world == 4 else None
            expect[name] = sends_by_rank(list(algo.schedule(world, NUMEL, 4, order, CHUNK)), world)
    finally:
        del os.environ["COMMLAYER_PS_SERVERS"]
    ref = sum(np.arange(NUMEL, dtype=np.float64) * (r + 1) for r in range(world))
    for name, want in expect.items():
        for r in range(world):
            assert got[r][name]["sent"] == want[r], f"{name}: rank {r} sent {got[r][name]['sent'][:6]}..., schedule says {want[r][:6]}..."
            np.testing.assert_allclose(got[r][name]["result"], ref, rtol=1e-6, err_msg=f"{name} rank {r}")
    want = sends_by_rank(barrier_schedule(world), world)
    for r in range(world):
        assert got[r]["barrier"]["sent"] == want[r], f"barrier: rank {r}"
    for graph in GRAPHS:
        gr = make_graph(graph, world, seed=0)
        want = sends_by_rank([gossip_schedule(gr, t, NUMEL * 4) for t in range(GOSSIP_ROUNDS)], world)
        for r in range(world):
            assert got[r]["gossip:" + graph]["sent"] == want[r], f"gossip {graph}: rank {r}"
        # the real averages equal the numpy product of the mixing matrices (reference)
        x = np.arange(world, dtype=np.float64)
        for t in range(GOSSIP_ROUNDS):
            x = gr.mixing(t) @ x
        for r in range(world):
            np.testing.assert_allclose(got[r]["gossip:" + graph]["result"][:3], [x[r]] * 3, rtol=1e-5, err_msg=graph)
