"""Cost of authentication and CurveZMQ encryption, on loopback and on an emulated 100 Mbit/s link.

Two ranks move ``--mbytes`` MiB rank 0 -> rank 1 with send/recv, ``--reps`` times per round, and
report achieved throughput; medians of ``--rounds`` rounds, variants interleaved round by round:

* ``auth``  : the zero-configuration default on loopback (job key from the store, ZMTP PLAIN,
              no encryption; ``COMMLAYER_ENCRYPT=off`` elsewhere);
* ``curve`` : CurveZMQ with keys from the job key (the default on a non-loopback address;
              forced here with ``COMMLAYER_ENCRYPT=on`` because the emulator's relays are local);
* ``secret``: CurveZMQ with ``COMMLAYER_SECRET``;
* ``gloo``  : torch's gloo, on loopback only (the relay emulator shapes commlayer's transport only).

    python benchmarks/security_overhead.py [--rate 100] [--mbytes 8] [--rounds 5] [--links loopback,emulated]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from commlayer.testing.machine import memcpy_gbps
from commlayer.testing import run_world

from commlayer.wan import emulated_world

VARIANTS = {"auth": {"COMMLAYER_ENCRYPT": "off"}, "curve": {"COMMLAYER_ENCRYPT": "on"},
            "secret": {"COMMLAYER_SECRET": "benchmark-job-secret-0123456789"}, "gloo": {}}


def _worker(rank: int, world: int, envs: list[dict[str, str]], backend: str, mbytes: int, reps: int) -> dict:
    os.environ.update(envs[rank])
    os.environ["COMMLAYER_IPC"] = "0"  # TCP even between local ranks: the path a remote peer takes
    dist.init_process_group(backend, timeout=timedelta(seconds=120))
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
    encrypted = backend == "zmq" and dist.group.WORLD.transport.curve is not None
    dist.destroy_process_group()
    return {"mbit": mbytes * 8 * 1.048576 * reps / dt, "encrypted": encrypted}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=100.0, help="emulated link rate, Mbit/s")
    ap.add_argument("--delay", type=float, default=5.0, help="emulated one-way delay, ms")
    ap.add_argument("--mbytes", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--links", default="loopback,emulated")
    args = ap.parse_args(argv)
    print(f"# {os.cpu_count()} cores, memcpy {memcpy_gbps():.1f} GB/s; {args.mbytes} MiB x {args.reps} send/recv per round, "
          f"median of {args.rounds} rounds", flush=True)
    links = {"default": {"delay_ms": args.delay, "rate_mbit": args.rate}, "world_size": 2}
    for link in args.links.split(","):
        names = [v for v in VARIANTS if link == "loopback" or v != "gloo"]
        res: dict[str, list[float]] = {v: [] for v in names}
        for r in range(args.rounds):
            for name in names:
                backend = "gloo" if name == "gloo" else "zmq"
                if link == "emulated":
                    with emulated_world(2, links, mode="relay", seed=r) as w:
                        envs = [{**{k: str(v) for k, v in w.env(i).items()}, **VARIANTS[name]} for i in range(2)]
                        out = run_world(_worker, 2, envs, backend, args.mbytes, args.reps, timeout=300)[1]
                else:
                    out = run_world(_worker, 2, [VARIANTS[name]] * 2, backend, args.mbytes, args.reps, timeout=300)[1]
                if name in ("curve", "secret") and not out["encrypted"]:
                    raise RuntimeError(f"variant {name} ran without encryption")
                res[name].append(out["mbit"])
                print(f"{link} round {r}: {name:6s} {out['mbit']:8.1f} Mbit/s", flush=True)
        med = {v: statistics.median(x) for v, x in res.items()}
        where = "loopback" if link == "loopback" else f"emulated {args.rate:.0f} Mbit/s, {2 * args.delay:.0f} ms RTT"
        print(f"\n## {where}\n| variant | median Mbit/s | vs auth |\n|---|---|---|")
        for v in names:
            print(f"| {v} | {med[v]:.1f} | {med[v] / med['auth']:.3f} |")
        print(flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
