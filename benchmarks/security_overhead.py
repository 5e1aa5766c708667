"""Cost of CurveZMQ encryption on an emulated 100 Mbit/s link, measured beside the plain transport.

Two ranks on one emulated link (user-space relays: 100 Mbit/s, 5 ms one way) alternate rounds of
with and without ``COMMLAYER_SECRET``; each round moves ``--mbytes`` MiB rank 0 -> rank 1 with
send/recv and reports achieved throughput. Medians of ``--rounds`` rounds.

    python benchmarks/security_overhead.py [--rate 100] [--mbytes 8] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from commlayer.testing import run_world

from commlayer.wan import emulated_world


def _worker(rank: int, world: int, envs: list[dict[str, str]], secret: str, mbytes: int, reps: int) -> float:
    os.environ.update(envs[rank])
    os.environ["COMMLAYER_IPC"] = "0"
    if secret:
        os.environ["COMMLAYER_SECRET"] = secret
    dist.init_process_group("zmq", timeout=timedelta(seconds=120))
    t = torch.ones(mbytes << 18)  # float32: mbytes MiB
    dist.barrier()
    if rank == 0:
        dist.send(t[:1024], dst=1)  # warm-up (TCP slow start)
    else:
        dist.recv(t[:1024], src=0)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        if rank == 0:
            dist.send(t, dst=1)
        else:
            dist.recv(t, src=0)
    dist.barrier()
    dt = time.perf_counter() - t0
    dist.destroy_process_group()
    return mbytes * 8 * 1.048576 * reps / dt  # Mbit/s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=100.0, help="link rate, Mbit/s")
    ap.add_argument("--delay", type=float, default=5.0, help="one-way delay, ms")
    ap.add_argument("--mbytes", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    links = {"default": {"delay_ms": args.delay, "rate_mbit": args.rate}, "world_size": 2}
    res: dict[str, list[float]] = {"plain": [], "curve": []}
    for r in range(args.rounds):
        for name, secret in (("plain", ""), ("curve", "benchmark-job-secret-0123456789")):
            with emulated_world(2, links, mode="relay", seed=r) as w:
                envs = [{k: str(v) for k, v in w.env(i).items()} for i in range(2)]
                res[name].append(run_world(_worker, 2, envs, secret, args.mbytes, args.reps, timeout=300)[1])
            print(f"round {r}: {name:5s} {res[name][-1]:7.1f} Mbit/s", flush=True)
    plain, curve = statistics.median(res["plain"]), statistics.median(res["curve"])
    print(f"\n# {args.mbytes} MiB x {args.reps} send/recv over an emulated {args.rate:.0f} Mbit/s, {2 * args.delay:.0f} ms RTT link, "
          f"median of {args.rounds} rounds")
    print(f"plain   {plain:7.1f} Mbit/s\ncurve   {curve:7.1f} Mbit/s\noverhead {100 * (plain - curve) / plain:5.1f} % of throughput")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
