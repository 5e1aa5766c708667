"""Gossip: graphs and weights (numpy), and D-PSGD training that survives a killed peer (real processes)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from commlayer.topologies import graphs
from multiproc import run_world

STEPS, KILL_AT = 40, 8


@pytest.mark.parametrize("name", graphs.GRAPHS)
@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_mixing_matrices(name: str, n: int) -> None:
    g = graphs.make_graph(name, n, seed=1)
    for t in range(4):
        w = g.mixing(t)
        if g.mixing_method(t=t) == "push_sum":
            assert np.allclose(w.sum(0), 1.0)
        else:
            assert graphs.is_doubly_stochastic(w), (name, n, t)
        assert (w >= 0).all()


def test_weights_renormalise_without_a_dead_node() -> None:
    g = graphs.ring(6)
    alive = [True] * 6
    alive[2] = False
    w = g.mixing(0, alive=alive)
    assert graphs.is_doubly_stochastic(w) and w[2, 2] == 1.0 and w[1, 2] == 0 and w[3, 2] == 0
    assert w[1, 1] == pytest.approx(1 - 1 / 3) and w[0, 1] == pytest.approx(1 / 3)


def test_push_sum_for_directed_graphs_and_slem() -> None:
    a = np.zeros((4, 4), dtype=bool)
    a[0, 1] = a[1, 2] = a[2, 3] = a[3, 0] = a[0, 2] = True  # not regular: uniform weights are not doubly stochastic
    assert graphs.from_adjacency(a).mixing_method() == "push_sum"
    assert graphs.exponential(8).mixing_method() == "uniform"
    lam = graphs.slem(graphs.ring(8).mixing(0))
    assert lam == pytest.approx(1 / 3 + 2 / 3 * np.cos(2 * np.pi / 8))
    assert graphs.contraction([graphs.ring(8).mixing(0)] * 5) == pytest.approx(lam ** 5)


def _dpsgd(rank: int, size: int) -> dict:
    from commlayer.topologies import World
    from commlayer.training import GossipAverager

    torch.manual_seed(0)
    world = World(rank, size, "127.0.0.1", int(os.environ["MASTER_PORT"]), timeout=30)
    gossip = world.gossip("ring", round_timeout=10)
    averager = GossipAverager(gossip)
    gen = torch.Generator().manual_seed(rank)
    true_w = torch.arange(4, dtype=torch.float32)
    x = torch.randn(64, 4, generator=gen)
    y = x @ true_w + 0.01 * torch.randn(64, generator=gen)
    model = torch.nn.Linear(4, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for step in range(STEPS):
        if rank == size - 1 and step == KILL_AT:
            os._exit(1)  # killed peer: no goodbye
        loss = torch.nn.functional.mse_loss(model(x).squeeze(1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        averager.average_parameters(model.parameters())
        losses.append(loss.item())
    dead = sorted(world.dead)
    world.close()
    return {"losses": losses, "dead": dead, "weight": model.weight.detach().numpy().ravel()}


def test_dpsgd_continues_when_a_peer_is_killed() -> None:
    res = run_world(_dpsgd, 4, timeout=90, allow_failures=True)
    assert isinstance(res[3], str) and "exited with code 1" in res[3]
    for r in res[:3]:
        assert len(r["losses"]) == STEPS and 3 in r["dead"]
        assert r["losses"][-1] < 0.05 * r["losses"][0]
    ws = np.stack([r["weight"] for r in res[:3]])
    assert np.abs(ws - np.arange(4)).max() < 0.1  # the survivors learned the shared model
