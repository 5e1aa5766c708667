"""Adaptation benchmark: a two-phase link schedule, static configurations vs the closed-loop controller.

4 ranks on emulated links (relay mode), every link 40 Mbit/s and 25 ms one-way. At ``--drop-at``
seconds the 0<->1 pair becomes 10x slower (4 Mbit/s). Each round runs one all-reduce with every
static configuration (tree; ring in the identity order; ring in the order 0-2-1-3) and one with the
controller's plan (exact policy), interleaved so all see the same conditions. A configuration's
time per step is the slowest rank's; the table reports each phase's median, and the oracle is the
best static configuration of that phase chosen with hindsight.

    python benchmarks/adaptation.py                         # defaults: 256 KiB, phases ~6 s and ~14 s
    python benchmarks/adaptation.py --bytes 128K --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from commlayer.testing import run_world

STATIC = {"tree": ("tree", None), "ring 0-1-2-3": ("ring", None), "ring 0-2-1-3": ("ring", (0, 2, 1, 3))}


def _worker(rank: int, world: int, envs: list[dict[str, str]], nbytes: int, t_drop: float, phase1_s: float,
            phase2_s: float) -> list[dict]:
    os.environ.update(envs[rank])
    import torch

    from commlayer.adapt.exchange import allgather_vector
    from commlayer.adapt.execute import run_allreduce
    from commlayer.adapt.planner import Plan, Planner, PlannerConfig
    from commlayer.adapt.probe import ProbeConfig
    from commlayer.adapt.session import barrier, connect
    from commlayer.topologies.reduce_ops import ReduceOp

    g = connect(rank, world, timeout=120)
    pl = Planner(g.transport, g.ranks, PlannerConfig(probe=ProbeConfig(pings=4, train_bytes=256 << 10), timeout=120,
                                                     probe_budget=0.0))
    pl.start()
    start = t_drop - phase1_s
    if time.monotonic() > start:
        raise RuntimeError(f"start-up ended {time.monotonic() - start:.1f} s after phase 1 should have begun; raise --drop-at")
    time.sleep(start - time.monotonic())
    x = torch.ones(nbytes // 4)
    rows = []
    for rnd in range(1000):
        row: dict = {"round": rnd, "t": time.monotonic() - t_drop}
        for k, (name, (algo, order)) in enumerate(STATIC.items()):
            plan = Plan(0, algo, 256 << 10, order, "", 1, 0.0)
            barrier(g, 10 + 10 * rnd + k)  # untimed: no rank carries the previous operation's skew
            t0 = time.perf_counter()
            run_allreduce(g, x, ReduceOp.SUM, plan)
            row[name] = time.perf_counter() - t0
        plan = pl.plan(nbytes)
        barrier(g, 10 + 10 * rnd + 9)
        t0 = time.perf_counter()
        run_allreduce(g, x, ReduceOp.SUM, plan)
        row["adaptive"] = dt = time.perf_counter() - t0
        row["plan"] = f"{plan.algo} {'-'.join(map(str, plan.ring_order or range(world)))} v{plan.version}"
        pl.observe(plan, nbytes, dt)
        row["replanned"] = pl.maybe_replan(rnd)
        row["t_end"] = time.monotonic() - t_drop
        rows.append(row)
        done = allgather_vector(g.transport, g.ranks, "__bench__", rnd, [float(time.monotonic() > t_drop + phase2_s)], 120)
        if done[0][0] > 0:
            break
    barrier(g, 1 << 30)
    pl.close()
    g.transport.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bytes", default="256K", help="all-reduce size (default 256K)")
    ap.add_argument("--drop-at", type=float, default=25.0, help="seconds after the world starts when 0<->1 slows 10x")
    ap.add_argument("--phase1", type=float, default=6.0, help="seconds measured before the drop")
    ap.add_argument("--phase2", type=float, default=14.0, help="seconds measured after the drop")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from commlayer.wan import LinkSpec, ScheduleStep, emulated_world
    from commlayer.wan.matrix import replace_links, uniform_matrix

    s = args.bytes.upper()
    nbytes = int(float(s[:-1]) * {"K": 1 << 10, "M": 1 << 20}[s[-1]]) if s[-1] in "KM" else int(s)
    slow = LinkSpec(25.0, 40.0, schedule=(ScheduleStep(args.drop_at, rate_mbit=4.0),))
    links = replace_links(uniform_matrix("two-phase", 4, LinkSpec(25.0, 40.0)), {(0, 1): slow, (1, 0): slow})
    with emulated_world(4, links) as w:
        t_drop = w.t0 + args.drop_at
        out = run_world(_worker, 4, [w.env(r) for r in range(4)], nbytes, t_drop, args.phase1, args.phase2, timeout=600)
    names = [*STATIC, "adaptive"]
    rounds = []
    for k, row in enumerate(out[0]):
        merged = {n: max(o[k][n] for o in out) for n in names}
        merged.update(t=row["t"], t_end=row["t_end"], plan=row["plan"], replanned=row["replanned"], round=k)
        rounds.append(merged)
    phases = {"phase 1 (40 Mbit/s)": [r for r in rounds if r["t_end"] < 0],
              "phase 2 (0<->1 at 4 Mbit/s)": [r for r in rounds if r["t"] > 0]}
    drop_round = next((r["round"] for r in rounds if r["t_end"] > 0), None)
    replan_round = next((r["round"] for r in rounds if r["replanned"] and r["t_end"] > 0), None)
    print(f"\n# all_reduce {nbytes >> 10} KiB float32, 4 ranks, 25 ms one-way; median s/step of the slowest rank")
    print(f"{'phase':<28} {'steps':>5} " + " ".join(f"{n:>13}" for n in names) + f" {'oracle':>13} {'adaptive/oracle':>16}")
    summary = {}
    for ph, rs in phases.items():
        med = {n: statistics.median(r[n] for r in rs) for n in names}
        oracle = min(STATIC, key=lambda n: med[n])
        ratio = med["adaptive"] / med[oracle]
        summary[ph] = {"steps": len(rs), **med, "oracle": oracle, "ratio": ratio, "plans": sorted({r["plan"] for r in rs})}
        print(f"{ph:<28} {len(rs):>5} " + " ".join(f"{med[n]:>13.3f}" for n in names) + f" {oracle:>13} {ratio:>15.2f}x")
    for ph, v in summary.items():
        print(f"{ph}: adaptive plans {v['plans']}")
    print(f"drop during round {drop_round}; re-plan at round {replan_round} "
          f"({'n/a' if None in (drop_round, replan_round) else replan_round - drop_round} rounds later)")
    if args.json:
        args.json.write_text(json.dumps({"rounds": rounds, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
