"""Topology benchmark: time per all-reduce / gossip round and bytes sent per node, with an alpha-beta fit.

For each world size, every topology (ring, tree, ps, gossip) x message size x codec is timed in
one spawn (real processes on this machine, transport over IPC/TCP loopback). alpha and beta are
measured by ping-pong between ranks 0 and 1 (least squares over sizes), and every row carries
the alpha-beta prediction of its time. Output: a table and JSON (schema in docs/topologies.md).

    python benchmarks/topologies.py --quick --json results/topologies.json
    python benchmarks/topologies.py --sizes 2 4 8 --bytes 4K 256K 4M --codecs none fp16 int8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from commlayer.testing import run_world

TOPOLOGIES = ("ring", "tree", "ps", "gossip")


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(s[:-1]) * mult[s[-1]]) if s[-1] in mult else int(s)


def _pingpong(world, sizes: list[int], reps: int) -> list[tuple[int, float]]:
    """Round-trip times between ranks 0 and 1 (seconds per round trip)."""
    from commlayer.topologies.comm import Group

    out = []
    if world.size < 2 or world.rank > 1:
        return out
    g = Group(world.transport, [0, 1], "bench/pingpong", world.timeout)
    for n in sizes:
        t = torch.zeros(max(1, n // 4), dtype=torch.float32)
        times = []
        for i in range(reps + 2):
            c = g.op("pp")
            t0 = time.perf_counter()
            if world.rank == 0:
                c.send_tensor(1, 0, t, copy=True)
                c.recv_tensor(1, 1, t.dtype, t.numel())
            else:
                x = c.recv_tensor(0, 0, t.dtype, t.numel()).clone()
                c.send_tensor(0, 1, x, copy=True)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        out.append((t.numel() * 4, statistics.median(times)))
    return out


def _worker(rank: int, size: int, nbytes: list[int], codecs: list[str], iters: int, pp_sizes: list[int]) -> dict:
    from commlayer.topologies import World

    world = World(rank, size, "127.0.0.1", int(os.environ["MASTER_PORT"]), timeout=300)
    pp = _pingpong(world, pp_sizes, 10)
    world.barrier()
    topos = {"ring": world.ring(), "tree": world.tree(), "ps": world.parameter_server(servers=min(2, size)),
             "gossip": world.gossip("ring")}
    maxer = world.tree()
    rows = []
    for name, topo in topos.items():
        for codec in codecs:
            for n in nbytes:
                x = torch.randn(max(1, n // 4), generator=torch.Generator().manual_seed(rank))
                spec = None if codec == "none" else codec
                world.barrier()
                topo.average(x, codec=spec)  # warm-up (codec state; the transport's post-barrier hand-off)
                b0 = topo.bytes_sent()
                t0 = time.perf_counter()
                for _ in range(iters):
                    topo.average(x, codec=spec)
                dt = (time.perf_counter() - t0) / iters
                sent = (topo.bytes_sent() - b0) / iters
                stats = maxer.allreduce(torch.tensor([dt, sent, -sent], dtype=torch.float64), "max")
                rows.append({"topology": name, "world_size": size, "bytes": x.numel() * 4, "codec": codec,
                             "seconds": float(stats[0]), "bytes_sent_per_node": sent, "bytes_sent_max": float(stats[1]),
                             "bytes_sent_min": float(-stats[2])})
    for t in (*topos.values(), maxer):
        t.close()
    world.barrier()
    world.close()
    return {"rows": rows, "pingpong": pp}


def fit_alpha_beta(pp: list[tuple[int, float]]) -> tuple[float, float]:
    """One-way alpha (s) and beta (s/byte) from round trips: rtt = 2 (alpha + beta n)."""
    n = np.array([p[0] for p in pp], dtype=float)
    t = np.array([p[1] for p in pp], dtype=float) / 2
    a = np.stack([np.ones_like(n), n], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(a, t, rcond=None)
    return max(float(alpha), 0.0), max(float(beta), 1e-15)


def predict(topology: str, p: int, wire: float, alpha: float, beta: float, servers: int, summable: bool = True) -> float:
    """alpha-beta model of one operation moving ``wire`` bytes per rank payload."""
    if p == 1:
        return 0.0
    if not summable and topology in ("ring", "tree"):  # all-gather of payloads (ring forwarding or direct sends)
        return (p - 1) * (alpha + wire * beta)
    if topology == "ring":
        return 2 * (p - 1) * alpha + 2 * (p - 1) / p * wire * beta
    if topology == "tree":
        steps = math.ceil(math.log2(p)) + (0 if p & (p - 1) == 0 else 2)
        return steps * (alpha + wire * beta)
    if topology == "ps":  # every server receives (p-1) shards and sends back (p-1): its link is the bottleneck
        return 2 * alpha + 2 * (p - 1) * (wire / servers) * beta
    return alpha + min(2, p - 1) * wire * beta  # gossip round on the ring graph: 2 neighbours


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--bytes", nargs="+", default=["4K", "256K", "4M"])
    ap.add_argument("--codecs", nargs="+", default=["none", "fp16", "int8"])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="sizes 2 4 8, 4K and 1M, codecs none and int8, 10 iterations")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.bytes, args.codecs, args.iters = [2, 4, 8], ["4K", "1M"], ["none", "int8"], 10
    nbytes = [parse_size(b) for b in args.bytes]
    pp_sizes = [64, 4096, 65536, 1 << 20, 4 << 20]
    from commlayer.codecs import from_spec

    rows, fits = [], {}
    print(f"{'topology':>8} {'p':>2} {'size':>9} {'codec':>6} {'time':>10} {'sent/node':>11} {'predicted':>10} {'ratio':>6}")
    for p in args.sizes:
        res = run_world(_worker, p, nbytes, args.codecs, args.iters, pp_sizes, timeout=1800)
        pp = res[0]["pingpong"]
        alpha, beta = fit_alpha_beta(pp) if pp else (0.0, 1e-15)
        fits[p] = {"alpha_s": alpha, "beta_s_per_byte": beta, "pingpong": pp}
        for row in res[0]["rows"]:
            codec = None if row["codec"] == "none" else from_spec(row["codec"])
            numel = row["bytes"] // 4
            wire = codec.wire_bytes(numel, torch.float32) if codec else row["bytes"]
            row["wire_bytes"] = wire
            row["alpha_s"], row["beta_s_per_byte"] = alpha, beta
            row["predicted_seconds"] = predict(row["topology"], p, wire, alpha, beta, min(2, p), codec is None or codec.linear)
            row["measured_over_predicted"] = row["seconds"] / row["predicted_seconds"] if row["predicted_seconds"] else None
            rows.append(row)
            print(f"{row['topology']:>8} {p:>2} {row['bytes']:>9} {row['codec']:>6} {row['seconds'] * 1e3:>8.2f}ms "
                  f"{row['bytes_sent_per_node']:>11.0f} {row['predicted_seconds'] * 1e3:>8.2f}ms "
                  f"{row['measured_over_predicted'] or 0:>6.2f}", flush=True)
        print(f"# p={p}: alpha={alpha * 1e6:.1f} us, beta={beta * 1e9:.3f} ns/B ({1 / beta / 1e9:.2f} GB/s) from ping-pong 0<->1")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"schema": "commlayer.topologies.bench/1", "host_cpus": os.cpu_count(),
                                         "alpha_beta": fits, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
