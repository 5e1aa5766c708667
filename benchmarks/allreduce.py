"""All-reduce benchmark: the zmq backend beside gloo, in one run, nccl-tests style.

Each rank creates the zmq default group and a gloo group over the same ranks, then for every
message size alternates zmq and gloo timing rounds so both see the same machine noise.
Reported time is the median over rounds of the slowest rank's mean time per all-reduce.

The header prints the machine's core count and memcpy bandwidth (a measured 64 MiB copy), and
the memory-bandwidth bound of the shared-memory all-reduce co-located ranks use: per rank it
copies its input in except its own slice ((p-1)/p memcpy of n bytes), reads its 1/p slice of
every input and writes the reduced slice ((1 + 1/p)/2 memcpy), and copies the p slices out (one
memcpy): at best t = (2.5 p - 0.5) n / (min(p, cores) * memcpy), i.e. busbw <= 2(p-1)/p * n / t
(memory bandwidth assumed to scale with the cores in use: an upper bound). Also printed: file
descriptors per rank (this process's count after the zmq group is up, and what the gloo group adds).
``--busy N`` runs N busy-loop processes meanwhile (the loaded-machine run). The cpu columns are
CPU seconds per all-reduce summed over all ranks and their threads: what the collective costs a
machine that is busy anyway, and less noisy than the wall time when others load it.

    python benchmarks/allreduce.py                 # 2 and 4 ranks, 4 B .. 64 MiB
    python benchmarks/allreduce.py --quick         # a short sweep (the README's main job)
    python benchmarks/allreduce.py --nproc 4 --min-bytes 16M --max-bytes 64M --rounds 5 --json out.json
    python benchmarks/allreduce.py --nproc 16 --sizes 4,64K,16M,64M --busy 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from commlayer.testing.machine import memcpy_gbps
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


def _iters_for(nbytes: int, quick: bool, max_iters: int) -> int:
    budget = 2e8 if not quick else 5e7  # bytes moved per timing round
    return int(max(3, min(max_iters if not quick else 50, budget // max(nbytes, 1))))


def shm_bound_busbw(p: int, cores: int, memcpy: float) -> float:
    """GB/s: the bus bandwidth a p-rank shared-memory all-reduce cannot exceed (see the module docstring)."""
    t_per_byte = (2.5 * p - 0.5) / (min(p, cores) * memcpy)
    return 2 * (p - 1) / p / t_per_byte


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _time(group: dist.ProcessGroup, t: torch.Tensor, iters: int) -> tuple[float, float]:
    """(seconds per all-reduce on the slowest rank, CPU seconds per all-reduce summed over the ranks)."""
    dist.barrier(group=group)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(iters):
        dist.all_reduce(t, group=group)
    dt = (time.perf_counter() - t0) / iters
    cpu = (time.process_time() - c0) / iters  # every thread of this process: the I/O threads too
    # The slowest rank defines the collective's time.
    x = torch.tensor([dt], dtype=torch.float64)
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    c = torch.tensor([cpu], dtype=torch.float64)
    dist.all_reduce(c, group=group)
    return float(x.item()), float(c.item())


def _worker(rank: int, world: int, sizes: list[int], rounds: int, quick: bool, algo: str, max_iters: int) -> dict:
    os.environ["COMMLAYER_ALGO"] = algo
    fds0 = _fds()
    dist.init_process_group("zmq", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    dist.all_reduce(torch.ones(1))  # lazily made state (the shared-memory region) counts too
    fds_zmq = _fds()
    gloo = dist.new_group(backend="gloo")
    dist.all_reduce(torch.ones(1), group=gloo)
    fds_gloo = _fds() - fds_zmq
    zmq = dist.group.WORLD
    out: dict = {"fds": (fds0, fds_zmq - fds0, fds_gloo)}
    for n in sizes:
        numel = max(1, n // 4)
        t = torch.ones(numel, dtype=torch.float32)
        iters = _iters_for(n, quick, max_iters)
        res: dict[str, list[float]] = {"zmq": [], "gloo": [], "zmq_cpu": [], "gloo_cpu": []}
        for name, g in (("zmq", zmq), ("gloo", gloo)):  # warm-up
            _time(g, t, max(1, iters // 10))
        for _ in range(rounds):
            for name, g in (("zmq", zmq), ("gloo", gloo)):
                wall, cpu = _time(g, t, iters)
                res[name].append(wall)
                res[f"{name}_cpu"].append(cpu)
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
    ap.add_argument("--sizes", default="", help="comma-separated sizes instead of --min/--max-bytes (e.g. 4,64K,16M)")
    ap.add_argument("--max-iters", type=int, default=200, help="all-reduces per timing round for the smallest sizes")
    ap.add_argument("--busy", type=int, default=0, help="busy-loop processes to run meanwhile (a loaded machine)")
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
        if args.sizes:
            sizes = [parse_size(x) for x in args.sizes.split(",")]
    cores = os.cpu_count() or 1
    busy = [subprocess.Popen(["timeout", "3000", sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        return _sweep(args, nprocs, sizes, rounds, cores)
    finally:
        for b in busy:
            b.kill()
            b.wait(timeout=10)


def _sweep(args: argparse.Namespace, nprocs: list[int], sizes: list[int], rounds: int, cores: int) -> int:
    results = []
    mc = memcpy_gbps()
    print(f"# nproc {cores}, memcpy {mc:.2f} GB/s (median of 7 copies of 64 MiB), {args.busy} busy-loop processes", flush=True)
    for p in nprocs:
        bound = shm_bound_busbw(p, cores, mc)
        print(f"\n# all_reduce SUM float32, {p} ranks on this machine, zmq (algo={args.algo}) vs gloo, median of {rounds} rounds; "
              f"shared-memory bound {bound:.3f} GB/s busbw", flush=True)
        data = run_world(_worker, p, sizes, rounds, args.quick, args.algo, args.max_iters, timeout=3000)
        fds = [d["fds"] for d in data]
        print(f"# fds per rank: {statistics.median(f[0] for f in fds):.0f} before init, zmq group +{statistics.median(f[1] for f in fds):.0f}, "
              f"gloo group +{statistics.median(f[2] for f in fds):.0f} (medians over ranks)")
        print(f"{'size':>10} {'zmq time':>11} {'zmq busbw':>11} {'gloo time':>11} {'gloo busbw':>11} {'speed-up':>9} {'zmq/bound':>9}"
              f" {'zmq cpu':>10} {'gloo cpu':>10}")
        data = data[0]
        for n in sizes:
            z, g = data[n]["zmq"], data[n]["gloo"]
            bus = lambda t: (n / t) * 2 * (p - 1) / p / 1e9  # noqa: E731 - GB/s, nccl-tests convention
            print(f"{human(n):>10} {z * 1e6:>9.1f}us {bus(z):>8.3f}GB/s {g * 1e6:>9.1f}us {bus(g):>8.3f}GB/s {g / z:>8.2f}x "
                  f"{bus(z) / bound:>8.2f} {data[n]['zmq_cpu'] * 1e6:>8.0f}us {data[n]['gloo_cpu'] * 1e6:>8.0f}us", flush=True)
            results.append({"nproc": p, "bytes": n, "zmq_s": z, "gloo_s": g, "zmq_busbw_GBps": bus(z), "gloo_busbw_GBps": bus(g),
                            "speedup": g / z, "zmq_cpu_s": data[n]["zmq_cpu"], "gloo_cpu_s": data[n]["gloo_cpu"], "memcpy_GBps": mc, "shm_bound_busbw_GBps": bound, "cores": cores, "busy": args.busy,
                            "fds": fds})
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
