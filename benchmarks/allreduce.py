"""All-reduce benchmark: the zmq backend beside gloo, in one run, nccl-tests style.

Each rank creates the zmq default group and a gloo group over the same ranks, then for every
message size alternates zmq and gloo timing rounds so both see the same machine noise.
Reported time is the median over rounds of the slowest rank's mean time per all-reduce.

    python benchmarks/allreduce.py                 # 2 and 4 ranks, 4 B .. 64 MiB
    python benchmarks/allreduce.py --quick         # a short sweep (the README's main job)
    python benchmarks/allreduce.py --nproc 4 --min-bytes 16M --max-bytes 64M --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from commlayer.testing import run_world


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(s[:-1]) * mult[s[-1]]) if s[-1] in mult else int(s)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _iters_for(nbytes: int, quick: bool) -> int:
    budget = 2e8 if not quick else 5e7  # bytes moved per timing round
    return int(max(3, min(200 if not quick else 50, budget // max(nbytes, 1))))


def _time(group: dist.ProcessGroup, t: torch.Tensor, iters: int) -> float:
    dist.barrier(group=group)
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(t, group=group)
    dt = (time.perf_counter() - t0) / iters
    # The slowest rank defines the collective's time.
    x = torch.tensor([dt], dtype=torch.float64)
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return float(x.item())


def _worker(rank: int, world: int, sizes: list[int], rounds: int, quick: bool, algo: str) -> dict:
    os.environ["COMMLAYER_ALGO"] = algo
    dist.init_process_group("zmq", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    gloo = dist.new_group(backend="gloo")
    zmq = dist.group.WORLD
    out = {}
    for n in sizes:
        numel = max(1, n // 4)
        t = torch.ones(numel, dtype=torch.float32)
        iters = _iters_for(n, quick)
        res = {"zmq": [], "gloo": []}
        for name, g in (("zmq", zmq), ("gloo", gloo)):  # warm-up
            _time(g, t, max(1, iters // 10))
        for _ in range(rounds):
            for name, g in (("zmq", zmq), ("gloo", gloo)):
                res[name].append(_time(g, t, iters))
        out[n] = {k: statistics.median(v) for k, v in res.items()}
    dist.destroy_process_group()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--min-bytes", default="4")
    ap.add_argument("--max-bytes", default="64M")
    ap.add_argument("--factor", type=int, default=4, help="size step multiplier")
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds per size (median reported)")
    ap.add_argument("--algo", default="auto", choices=["auto", "ring", "tree"])
    ap.add_argument("--quick", action="store_true", help="short sweep: 4 ranks, 4 B/64 KiB/1 MiB/16 MiB, 3 rounds")
    ap.add_argument("--json", type=Path, help="write results here")
    args = ap.parse_args(argv)
    if args.quick:
        nprocs, sizes, rounds = [4], [4, 64 << 10, 1 << 20, 16 << 20], 3
    else:
        nprocs, rounds = args.nproc, args.rounds
        sizes, n = [], parse_size(args.min_bytes)
        while n <= parse_size(args.max_bytes):
            sizes.append(n)
            n *= args.factor
    results = []
    for p in nprocs:
        print(f"\n# all_reduce SUM float32, {p} ranks on this machine, zmq (algo={args.algo}) vs gloo, median of {rounds} rounds", flush=True)
        print(f"{'size':>10} {'zmq time':>11} {'zmq busbw':>11} {'gloo time':>11} {'gloo busbw':>11} {'speed-up':>9}")
        data = run_world(_worker, p, sizes, rounds, args.quick, args.algo, timeout=3000)[0]
        for n in sizes:
            z, g = data[n]["zmq"], data[n]["gloo"]
            bus = lambda t: (n / t) * 2 * (p - 1) / p / 1e9  # noqa: E731 - GB/s, nccl-tests convention
            print(f"{human(n):>10} {z * 1e6:>9.1f}us {bus(z):>8.3f}GB/s {g * 1e6:>9.1f}us {bus(g):>8.3f}GB/s {g / z:>8.2f}x", flush=True)
            results.append({"nproc": p, "bytes": n, "zmq_s": z, "gloo_s": g, "zmq_busbw_GBps": bus(z), "gloo_busbw_GBps": bus(g), "speedup": g / z})
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
