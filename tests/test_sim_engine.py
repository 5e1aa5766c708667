"""The simulator's core against references: a Python FIFO loop, the adapt cost model, closed-form bytes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from commlayer.adapt.cost import CodecProfile, allreduce_time
from commlayer.sim.churn import Churn, speeds_for
from commlayer.sim.engine import Engine, EngineConfig, fifo, scan
from commlayer.sim.links import sim_links
from commlayer.sim.scenario import Scenario, simulate_rounds
from commlayer.topologies import registry
from commlayer.topologies.cost import CostParams

pytestmark = pytest.mark.unit
EXACT_CFG = EngineConfig(jitter=False, loss=False)


def _fifo_loop(keys: np.ndarray, ready: np.ndarray, service: np.ndarray) -> np.ndarray:
    out = np.empty_like(ready)
    free: dict[int, float] = {}
    for i in sorted(range(len(keys)), key=lambda i: (keys[i], ready[i])):
        out[i] = max(ready[i], free.get(int(keys[i]), 0.0)) + service[i]
        free[int(keys[i])] = out[i]
    return out


def test_fifo_and_scan_match_a_python_queue() -> None:
    rng = np.random.Generator(np.random.PCG64(3))
    keys, ready, svc = rng.integers(0, 7, 300), rng.random(300) * 5, rng.random(300)
    np.testing.assert_allclose(fifo(keys, ready, svc, np.zeros(7)), _fifo_loop(keys, ready, svc))
    r, s = np.sort(rng.random((4, 9)), axis=1), rng.random((4, 9))
    want = np.array([_fifo_loop(np.zeros(9, dtype=int), r[q], s[q]) for q in range(4)])
    np.testing.assert_allclose(scan(r, s, np.zeros(4)), want)


@pytest.mark.parametrize("profile", ["hetero", "intercontinental", "wan-20mbit-50ms"])
@pytest.mark.parametrize("p", [4, 5, 8])
@pytest.mark.parametrize("algo", ["ring", "tree", "chain", "ps"])
def test_schedule_replay_agrees_with_the_adapt_cost_model(profile: str, p: int, algo: str) -> None:
    """Two implementations of one link model: the per-algorithm replay of adapt and the generic engine."""
    links = sim_links(profile, p)
    for nbytes in (64 << 10, 4 << 20):
        sched = registry.get(algo).schedule
        assert sched is not None
        sim = Engine(links, EXACT_CFG).run(sched(p, nbytes // 4, 4, None, 256 << 10), np.zeros(p)).max()
        model = allreduce_time(links.snapshot(), nbytes, algo, None, 256 << 10, CostParams())
        # ring/PS differ by the last ragged chunk and where the per-message overhead sits
        assert sim == pytest.approx(model, rel=0.05 if algo in ("ring", "ps") else 0.01), (nbytes, sim, model)


def test_device_contention_shares_a_servers_downlink() -> None:
    n, nbytes = 16, 1 << 20
    links = sim_links("home-broadband", n)
    sched = registry.get("ps").schedule
    assert sched is not None
    t_link = Engine(links, EXACT_CFG).run(sched(n, nbytes // 4, 4, None, 1 << 20), np.zeros(n)).max()
    dev = Engine(links, EngineConfig(contention="device", jitter=False, loss=False))
    t_dev = dev.run(sched(n, nbytes // 4, 4, None, 1 << 20), np.zeros(n)).max()
    # the server's 200 Mbit/s downlink takes 15 pushes one after another; its 20 Mbit/s uplink 15 pulls
    down, up = links.down_Bps[0], links.up_Bps[0]
    assert t_dev >= (n - 1) * nbytes / down + (n - 1) * nbytes / up
    assert t_link < t_dev / 5
    assert dev.sent[0] == (n - 1) * nbytes and dev.sent[1] == nbytes


@pytest.mark.parametrize("topology", ["ring", "tree", "ps", "ps-async", "gossip:exponential", "gossip:random_matching",
                                      "gossip:torus", "chain"])
def test_scenarios_bytes_per_device_match_closed_forms(topology: str) -> None:
    n, nbytes = 64, 1 << 20
    links = sim_links("mix:home-broadband=0.9,lte-phone=0.1", n, seed=1)
    sc = Scenario(topology, nbytes, rounds=3, compute_s=0.1)
    res = simulate_rounds(Engine(links, EngineConfig(contention="device")), sc, speeds_for(links.devices))
    assert np.all(np.diff(res.end) > 0) and np.isfinite(res.end).all()
    sent = res.sent_per_node
    if topology == "ring":
        np.testing.assert_allclose(sent, 2 * (n - 1) / n * nbytes, rtol=1e-3)
    elif topology == "tree":
        np.testing.assert_allclose(sent, math.log2(n) * nbytes)
    elif topology in ("ps", "ps-async"):
        assert sent[0] == pytest.approx((n - 1) * nbytes) and sent[1:] == pytest.approx(nbytes)
    elif topology == "gossip:exponential":
        np.testing.assert_allclose(sent, math.log2(n) * nbytes)
    elif topology == "gossip:torus":
        np.testing.assert_allclose(sent, 4 * nbytes)
    elif topology == "gossip:random_matching":
        np.testing.assert_allclose(sent, nbytes)
    if topology == "ps-async":
        assert res.staleness_max > 0  # workers at different speeds see others' updates between read and push
    assert (res.energy_per_node > 0).all()


def test_codec_shrinks_bytes_and_adds_codec_time() -> None:
    n, nbytes = 8, 4 << 20
    links = sim_links("wan-20mbit-50ms", n)
    exact = simulate_rounds(Engine(links, EXACT_CFG), Scenario("ring", nbytes, rounds=2), np.ones(n))
    slow_codec = CodecProfile("x", ratio=0.25, encode_Bps=1e8, decode_Bps=1e8)
    comp = simulate_rounds(Engine(links, EXACT_CFG), Scenario("ring", nbytes, slow_codec, rounds=2), np.ones(n))
    np.testing.assert_allclose(comp.sent_per_node, exact.sent_per_node / 4, rtol=1e-3)
    assert comp.end[0] > 2 * nbytes / 1e8  # encode + decode are on the clock


def test_local_sgd_period_communicates_every_h_rounds_and_churn_is_stationary() -> None:
    n = 32
    links = sim_links("lte", n)
    res = simulate_rounds(Engine(links, EXACT_CFG), Scenario("ring", 1 << 16, rounds=8, period=4, compute_s=1.0), np.ones(n))
    assert res.comm_rounds == 2
    c = Churn(4000, leave=0.1, rejoin=0.3, seed=2)
    fr = [c.step(r).mean() for r in range(30)]
    assert np.mean(fr) == pytest.approx(0.75, abs=0.02)


@pytest.mark.parametrize("contention", ["device", "link"])
@pytest.mark.parametrize("profile", ["mix:home-broadband=0.7,lte-phone=0.3", "hetero"])
def test_row_space_runs_give_the_step_by_step_results(contention: str, profile: str) -> None:
    """The fused replay of ring/chain steps (commlayer/sim/rows.py) against the step-by-step engine:
    same finish times, queue states and random draws (jitter and loss on), several rounds, mapped nodes."""
    n = 13
    links = sim_links(profile, n, seed=1)
    nodes = np.array([5, 3, 11, 0, 8, 1, 12, 2, 9, 4, 7, 10, 6])
    # ring: 308 B and 20 KB blocks in one chunk (fused), then 5 chunks per block (step by step)
    for algo, numel, chunk in (("ring", 1001, 1 << 12), ("ring", 1 << 16, 1 << 20), ("ring", 1 << 16, 1 << 12),
                               ("chain", 999, 1 << 12), ("tree", 1001, 1 << 12), ("ps", 1001, 1 << 12)):
        sched = registry.get(algo).schedule
        assert sched is not None
        engines = [Engine(links, EngineConfig(contention=contention, seed=4)) for _ in range(2)]
        for r in range(3):
            start = np.linspace(0.0, 0.05, n) + r
            ref = engines[0].run(sched(n, numel, 4, None, chunk), start, nodes, fuse=False)
            got = engines[1].run(sched(n, numel, 4, None, chunk), start, nodes, fuse=True)
            np.testing.assert_array_equal(got, ref, err_msg=f"{algo} {numel} round {r}")
        a, b = engines
        for name in ("cpu", "up_free", "down_free", "sent") + (("link_free",) if contention == "link" else ()):
            np.testing.assert_array_equal(getattr(b, name), getattr(a, name), err_msg=f"{algo}: {name}")
        np.testing.assert_allclose(b.energy, a.energy, rtol=1e-12)
        assert a.messages == b.messages
        assert float(a.rng.random()) == float(b.rng.random())  # the same number of draws


def test_simulated_rounds_with_churn_are_the_same_fused_or_not() -> None:
    n = 48
    links = sim_links("mix:home-broadband=0.8,lte-phone=0.2", n, seed=2)
    out = []
    for fuse in (False, True):
        eng = Engine(links, EngineConfig(contention="device", seed=1))
        plain = eng.run
        eng.run = lambda *a, **k: plain(*a, fuse=fuse, **k)  # type: ignore[method-assign]
        res = simulate_rounds(eng, Scenario("ring", 1 << 16, rounds=6, compute_s=0.2), speeds_for(links.devices),
                              Churn(n, 0.1, 0.5, seed=3))
        out.append((res.end, res.sent_per_node, eng.messages))
    np.testing.assert_array_equal(out[0][0], out[1][0])
    np.testing.assert_array_equal(out[0][1], out[1][1])
    assert out[0][2] == out[1][2] > 0
