"""Where a compressed all-reduce's time goes on emulated links: encode, all-gather, combine, per rank.

    python benchmarks/simulate_phases.py RANKS PROFILE      # e.g. 8 wan-20mbit-50ms

Runs the plan executor (as ``commlayer simulate --validate`` does) with the codec's encode, the
all-gather (``allgather_encoded``) and ``combine`` timed on every rank, 4 reps after a warm-up.
Prints the machine line (cores, load, memcpy) before and after.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from commlayer.testing.machine import machine_line

def worker(rank: int, world: int, envs: list[dict[str, str]], configs: list[tuple[str, str]], nbytes: int,
           reps: int) -> dict[str, Any]:
    os.environ.update(envs[rank])
    import torch
    import commlayer.topologies.codec_allreduce as ca
    import commlayer.codecs.aggregate as ag
    from commlayer.adapt.execute import CodecCache, run_allreduce
    from commlayer.adapt.planner import Plan
    from commlayer.topologies import World
    from commlayer.topologies.reduce_ops import ReduceOp
    torch.set_num_threads(1)
    log: list[tuple[str, float, float]] = []

    def wrap(mod: Any, name: str, tag: str) -> None:
        f = getattr(mod, name)

        def g(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            r = f(*a, **k)
            log.append((tag, t, time.perf_counter()))
            return r
        setattr(mod, name, g)

    wrap(ca, "allgather_encoded", "gather")
    wrap(ag, "combine", "combine")
    w = World.from_env(timeout=120)
    codecs = CodecCache()
    out: dict[str, Any] = {}
    try:
        group = w.group("ph")
        for topo, spec in configs:
            c = codecs.get(spec)
            enc = c.encode
            def timed(x: Any, ctx: Any, enc: Any = enc) -> Any:
                t = time.perf_counter()
                r = enc(x, ctx)
                log.append(("encode", t, time.perf_counter()))
                return r
            c.encode = timed
            x = torch.randn(nbytes // 4, generator=torch.Generator().manual_seed(rank))
            recs = []
            for k in range(reps + 1):
                w.barrier()
                log.clear()
                t0 = time.perf_counter()
                run_allreduce(group, x, ReduceOp.AVG, Plan(0, topo, 1 << 20, None, spec, 1, 0.0), codecs,
                              key=f"{topo}|{spec}", step=k)
                t1 = time.perf_counter()
                recs.append({"total": t1 - t0, **{tag: b - a for tag, a, b in log},
                             "start_to_gather": next((a - t0 for tag, a, _ in log if tag == "gather"), None)})
            out[f"{topo}|{spec}"] = recs[1:]
        w.barrier()
    finally:
        w.close()
    return out

def main() -> int:
    from commlayer.testing import run_world
    from commlayer.wan import emulated_world
    n, prof = int(sys.argv[1]), sys.argv[2]
    configs = [("tree", "topk:ratio=0.01+ef"), ("ps", "topk:ratio=0.01+ef"), ("tree", "int8+ef"), ("ps", "int8+ef"),
               ("ring", "topk:ratio=0.01+ef")]
    print(machine_line(), flush=True)
    with emulated_world(n, prof, mode="relay") as world:
        res = run_world(worker, n, [world.env(r) for r in range(n)], configs, 1 << 20, 4, timeout=500)
    for topo, spec in configs:
        key = f"{topo}|{spec}"
        print(key)
        for k in range(4):
            tot = max(r[key][k]["total"] for r in res)
            cells = [f"{r[key][k].get('encode', 0) * 1e3:.0f}/{(r[key][k]['start_to_gather'] or 0) * 1e3:.0f}/"
                     f"{r[key][k].get('gather', 0) * 1e3:.0f}/{r[key][k].get('combine', 0) * 1e3:.0f}" for r in res]
            print(f"  rep {k}: slowest total {tot * 1e3:6.0f} ms | per rank encode/start->gather/gather/combine ms: "
                  + "  ".join(cells), flush=True)
    print(machine_line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
