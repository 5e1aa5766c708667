"""Adaptation over real processes and emulated links (relay mode): probes, cost model, controller.

Links are slow and transfers short (a few hundred KiB), so each world finishes in seconds.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import pytest
import torch

from commlayer.wan import LinkSpec, ScheduleStep, emulated_world
from commlayer.wan.matrix import replace_links, uniform_matrix
from multiproc import run_world

# uniform 40 Mbit/s, 20 ms one-way; the 0<->1 pair is 4 Mbit/s in both directions
SLOW_PAIR = replace_links(uniform_matrix("slow-pair", 4, LinkSpec(20.0, 40.0)),
                          {(0, 1): LinkSpec(20.0, 4.0), (1, 0): LinkSpec(20.0, 4.0)})


def _setup(rank: int, world: int, envs: list[dict[str, str]], **cfg: Any):
    os.environ.update(envs[rank])
    from commlayer.adapt.planner import Planner, PlannerConfig
    from commlayer.adapt.probe import ProbeConfig
    from commlayer.adapt.session import connect

    g = connect(rank, world, timeout=60)
    cfg.setdefault("probe", ProbeConfig(pings=4, train_bytes=256 << 10, timeout=30))
    pl = Planner(g.transport, g.ranks, PlannerConfig(timeout=30, **cfg))
    pl.start()
    return g, pl


def _teardown(g: Any, pl: Any) -> None:
    from commlayer.adapt.session import barrier

    barrier(g, 99)
    pl.close()
    g.transport.close()


def _probe_and_plan(rank: int, world: int, envs: list[dict[str, str]]) -> dict:
    from commlayer.adapt.execute import run_allreduce
    from commlayer.adapt.planner import Plan
    from commlayer.topologies.reduce_ops import ReduceOp

    g, pl = _setup(rank, world, envs)
    n = 512 << 10
    best = pl.plan(n)
    runs = {}
    configs = {"best": best,
               "identity-ring": Plan(pl.version, "ring", best.chunk_bytes, None, "", 1, pl.predict(n, "ring", None, best.chunk_bytes)),
               "tree": Plan(pl.version, "tree", 1 << 20, None, "", 1, pl.predict(n, "tree", None, 1 << 20))}
    for name, plan in configs.items():
        ts = []
        for k in range(2):
            x = torch.full((n // 4,), float(rank + 1))
            t0 = time.perf_counter()
            run_allreduce(g, x, ReduceOp.SUM, plan)
            ts.append(time.perf_counter() - t0)
            assert torch.all(x == sum(range(1, world + 1))), f"{name}: wrong sum"
        runs[name] = (plan.predicted_s, min(ts))
    snap = pl.snapshot.as_dict()
    _teardown(g, pl)
    return {"snap": snap, "best": best.as_dict(), "runs": runs}


def test_probe_cost_model_and_ring_order_on_heterogeneous_links() -> None:
    with emulated_world(4, SLOW_PAIR) as w:
        out = run_world(_probe_and_plan, 4, [w.env(r) for r in range(4)], timeout=150)
    assert all(o["snap"] == out[0]["snap"] for o in out), "ranks disagree on the link matrix"
    assert all(o["best"] == out[0]["best"] for o in out), "ranks disagree on the plan"
    for link in out[0]["snap"]["links"]:  # measured estimates within tolerance of the emulated values
        spec = SLOW_PAIR.link(link["src"], link["dst"])
        # scheduling delays on the shared 2-core host only add: allow +-3 ms
        assert link["latency_ms"] == pytest.approx(spec.delay_ms, rel=0.1, abs=3.0), link
        assert link["bandwidth_mbit"] == pytest.approx(spec.rate_mbit, rel=0.15), link
    best = out[0]["best"]
    assert best["algo"] == "ring" and best["ring_order"] is not None
    order = best["ring_order"]
    ring_links = {(order[k], order[(k + 1) % 4]) for k in range(4)}
    assert not ring_links & {(0, 1), (1, 0)}, f"ring order {order} uses the slow 0<->1 links"
    # the model's choice is the measured fastest (within noise) and its predictions hold within 15 %
    meas = {k: max(o["runs"][k][1] for o in out) for k in out[0]["runs"]}
    for name, (pred, _) in out[0]["runs"].items():
        assert pred == pytest.approx(meas[name], rel=0.15), (name, pred, meas[name])
    assert meas["best"] <= 1.1 * min(meas.values()), meas


def _rate_drop(rank: int, world: int, envs: list[dict[str, str]], t_drop: float) -> dict:
    from commlayer.adapt.execute import run_allreduce
    from commlayer.topologies.reduce_ops import ReduceOp

    g, pl = _setup(rank, world, envs, drift_threshold=0.5, probe_budget=0.0)
    n = 256 << 10
    steps: list[dict] = []
    x = torch.ones(n // 4)
    if time.monotonic() > t_drop - 1.0:
        raise RuntimeError("start-up took longer than the emulator's schedule allows; raise the drop time")
    time.sleep(t_drop - 1.0 - time.monotonic())  # every rank starts stepping 1 s before the drop
    for step in range(60):
        plan = pl.plan(n)
        t0 = time.perf_counter()
        run_allreduce(g, x, ReduceOp.SUM, plan)
        dt = time.perf_counter() - t0
        pl.observe(plan, n, dt)
        replanned = pl.maybe_replan(step)
        steps.append({"step": step, "t": time.monotonic(), "version": plan.version, "replanned": replanned,
                      "bw": pl.snapshot.beta[0][1]})
        if step > 6 and time.monotonic() > t_drop + 1.0 and sum(s["replanned"] for s in steps) >= 1:
            break
    # every rank leaves the loop at the same step: agree on it
    from commlayer.adapt.exchange import allgather_vector

    last = allgather_vector(g.transport, g.ranks, "__test__", 1, [float(len(steps))], 30)
    _teardown(g, pl)
    return {"steps": steps, "last": last}


def test_rate_drop_triggers_replan_within_three_steps() -> None:
    t0 = time.monotonic()
    # 40 -> 4 Mbit/s on every link, 40 s after the world starts (start-up and probes take 3-8 s idle, over 11 s at load 20)
    spec = LinkSpec(10.0, 40.0, schedule=(ScheduleStep(40.0, rate_mbit=4.0),))
    with emulated_world(3, uniform_matrix("drop", 3, spec)) as w:
        t_drop = w.t0 + 40.0
        out = run_world(_rate_drop, 3, [w.env(r) for r in range(3)], t_drop, timeout=150)
    assert time.monotonic() - t0 < 150
    steps = out[0]["steps"]
    assert all(o["steps"][i]["version"] == s["version"] for o in out for i, s in enumerate(steps)), "ranks ran different plans"
    first_slow = next(i for i, s in enumerate(steps) if s["t"] > t_drop)
    replans = [i for i, s in enumerate(steps) if s["replanned"]]
    assert replans and replans[0] >= first_slow - 1, (replans, first_slow)
    assert replans[0] - first_slow <= 3, f"re-plan at step {replans[0]}, drop at step {first_slow}"
    # the new matrix reflects the slower link
    assert steps[-1]["bw"] * 8e-6 == pytest.approx(4.0, rel=0.2)


def _mismatch(rank: int, world: int, envs: list[dict[str, str]]) -> str:
    from commlayer.adapt.execute import run_allreduce
    from commlayer.adapt.planner import Plan
    from commlayer.topologies.reduce_ops import ReduceOp
    from commlayer.transport.errors import CommError

    os.environ.update(envs[rank])
    from commlayer.adapt.session import connect

    g = connect(rank, world, timeout=20)
    g.timeout = 10
    plan = Plan(1 + rank, "ring", 1 << 16, None, "", 1, 0.0)  # ranks disagree on the plan version
    try:
        run_allreduce(g, torch.ones(1 << 14), ReduceOp.SUM, plan)
        res = "no error"
    except CommError as exc:
        res = str(exc)
    time.sleep(0.5)
    g.transport.close()
    return res


def test_plan_mismatch_is_an_error_not_a_hang() -> None:
    envs = [{} for _ in range(2)]
    t0 = time.monotonic()
    out = run_world(_mismatch, 2, envs, timeout=60)
    assert time.monotonic() - t0 < 30
    assert all("collective mismatch" in o for o in out), out
