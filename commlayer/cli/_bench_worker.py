"""One rank of ``commlayer bench`` (run under :func:`commlayer.demo.runner.run_world`).

For each message size, every variant (zmq group with an algo/codec) and gloo are timed in
alternation, ``rounds`` times, so they see the same machine and link noise. A round's time is the
slowest rank's mean time per all_reduce. Rank 0 prints ``@@ point JSON`` lines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from commlayer.backend.options import ZmqOptions


def _time(group, t: torch.Tensor, iters: int) -> float:  # type: ignore[no-untyped-def]
    dist.barrier(group=group)
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(t, group=group)
    x = torch.tensor([(time.perf_counter() - t0) / iters], dtype=torch.float64)
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return float(x.item())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", required=True, help="comma-separated byte counts")
    ap.add_argument("--variants", required=True, help="JSON list of [algo, codec]")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget-bytes", type=int, default=4 << 20, help="bytes per timing round (sets iterations)")
    ap.add_argument("--max-iters", type=int, default=20)
    ap.add_argument("--gloo", action="store_true", help="also time gloo")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("zmq", timeout=timedelta(seconds=300))
    rank = dist.get_rank()
    groups: dict[str, object] = {}
    for algo, codec in json.loads(args.variants):
        groups[f"zmq|{algo}|{codec}"] = dist.new_group(backend="zmq", pg_options=ZmqOptions(algo=algo, codec=codec))
    if args.gloo:
        groups["gloo||"] = dist.new_group(backend="gloo", timeout=timedelta(seconds=300))
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            t = torch.ones(max(1, n // 4), dtype=torch.float32)
            iters = int(max(1, min(args.max_iters, args.budget_bytes // max(n, 1))))
            times: dict[str, list[float]] = {k: [] for k in groups}
            for k, g in groups.items():
                _time(g, t, 1)  # warm-up (connections, codec state)
            for _ in range(args.rounds):
                for k, g in groups.items():
                    times[k].append(_time(g, t, iters))
            if rank == 0:
                for k, v in times.items():
                    backend, algo, codec = k.split("|")
                    print("@@ point " + json.dumps({"bytes": n, "backend": backend, "algo": algo, "codec": codec,
                                                    "time_s": statistics.median(v), "times_s": v, "iters": iters}), flush=True)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
