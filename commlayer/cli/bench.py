"""``commlayer bench``: all_reduce sweep of sizes x algorithms x codecs x link profiles, gloo beside.

One emulated world per profile (netns mode when root, so gloo crosses the same emulated links;
relay mode shapes only commlayer, so gloo is skipped there). Prints an nccl-tests-style table with
gloo/zmq ratio columns, writes JSON and PNG plots of busbw and time against size.
busbw follows nccl-tests: algbw x 2(n-1)/n.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from commlayer.cli._common import CliError, Progress, check_links, check_nproc, human, parse_size


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("bench", help="all_reduce sweep (sizes x algos x codecs x profiles) beside gloo",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--links", default="datacenter,wan-20mbit-50ms", help="comma-separated profiles or link-matrix files")
    p.add_argument("--algos", default="ring,tree,auto", help="comma-separated zmq algorithms (ring, tree, auto)")
    p.add_argument("--codecs", default=",int8+ef", help="';'-separated codec specs; empty = exact (default: exact;int8+ef)")
    p.add_argument("--min-bytes", default="4K")
    p.add_argument("--max-bytes", default="4M")
    p.add_argument("--factor", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="timing rounds per point (median reported)")
    p.add_argument("--budget-bytes", default="8M", help="bytes per timing round (sets iterations)")
    p.add_argument("--mode", choices=["relay", "netns"], default=None, help="default: netns when root, else relay")
    p.add_argument("--no-gloo", action="store_true", help="skip gloo")
    p.add_argument("--json", default="bench_results.json")
    p.add_argument("--png", default="bench_results.png")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.set_defaults(func=run)


def _sizes(args: argparse.Namespace) -> list[int]:
    lo, hi = parse_size(args.min_bytes), parse_size(args.max_bytes)
    if lo < 4 or hi < lo or args.factor < 2:
        raise CliError(f"sizes: expected 4 <= --min-bytes <= --max-bytes and --factor >= 2, got {lo}, {hi}, {args.factor}")
    out: list[int] = []
    n = lo
    while n <= hi and len(out) < 64:
        out.append(n)
        n *= args.factor
    return out


def run(args: argparse.Namespace) -> int:
    from commlayer.backend.options import ZmqOptions
    from commlayer.demo.runner import pick_mode, run_world

    check_nproc(args.nproc)
    if args.nproc < 2:
        raise CliError(f"--nproc: expected >= 2, got {args.nproc}")
    profiles = [p for p in args.links.split(",") if p]
    for prof in profiles:
        check_links(prof, args.nproc)
    algos = [a for a in args.algos.split(",") if a]
    codecs = args.codecs.split(";") if ";" in args.codecs else args.codecs.split(",")
    variants = []
    for a in algos:
        for c in codecs:
            try:
                ZmqOptions(algo=a, codec=c)
            except ValueError as exc:
                raise CliError(str(exc)) from None
            variants.append([a, c])
    try:
        mode, note = pick_mode(args.mode)
    except RuntimeError as exc:
        raise CliError(str(exc)) from None
    gloo = not args.no_gloo and mode == "netns"
    if note or (mode == "relay" and not args.no_gloo):
        print("note: relay mode shapes only commlayer's transport; gloo is skipped (use --mode netns as root)", flush=True)
    sizes = _sizes(args)
    points: list[dict[str, Any]] = []
    per_size = len(variants) + (1 if gloo else 0)
    bar = Progress(len(profiles) * len(sizes) * per_size, "bench")
    for prof in profiles:
        def on_event(event: str, data: dict[str, Any], prof: str = prof) -> None:
            if event == "point":
                data["profile"] = prof
                points.append(data)
                bar.update(1, f"{prof} {human(data['bytes'])} {data['backend']} {data['algo']} {data['codec']}")

        wargs = ["--sizes", ",".join(map(str, sizes)), "--variants", json.dumps(variants), "--rounds", str(args.rounds),
                 "--budget-bytes", str(parse_size(args.budget_bytes))] + (["--gloo"] if gloo else [])
        res = run_world(args.nproc, prof, mode, "commlayer.cli._bench_worker", wargs, timeout_s=args.timeout, on_event=on_event)
        if any(res.returncodes):
            print("\n".join(res.tail[-20:]), file=sys.stderr)
            raise CliError(f"profile {prof}: ranks exited with {res.returncodes}")
    print(format_table(points, args.nproc))
    doc = {"nproc": args.nproc, "mode": mode, "gloo": gloo, "busbw_factor": 2 * (args.nproc - 1) / args.nproc, "points": points}
    Path(args.json).write_text(json.dumps(doc, indent=1))
    plot(points, args.nproc, args.png)
    print(f"wrote {args.json} and {args.png}")
    return 0


def busbw(nbytes: int, t: float, n: int) -> float:
    """nccl-tests bus bandwidth of an all_reduce, GB/s."""
    return nbytes / t * 2 * (n - 1) / n / 1e9


def format_table(points: list[dict[str, Any]], n: int) -> str:
    """nccl-tests-style rows: one per (profile, algo, codec, size), gloo's time and the ratio beside."""
    gloo = {(p["profile"], p["bytes"]): p["time_s"] for p in points if p["backend"] == "gloo"}
    head = f"{'profile':<18}{'algo':<6}{'codec':<14}{'size':>10}{'time':>12}{'busbw':>12}{'gloo time':>12}{'gloo busbw':>12}{'gloo/zmq':>10}"
    lines = [f"# all_reduce SUM float32, {n} ranks; time = median over rounds of the slowest rank's mean", head]
    for p in points:
        if p["backend"] != "zmq":
            continue
        t, g = p["time_s"], gloo.get((p["profile"], p["bytes"]))
        gcols = f"{g * 1e3:>10.2f}ms{busbw(p['bytes'], g, n):>8.4f}GB/s{g / t:>9.2f}x" if g else f"{'n/a':>12}{'n/a':>12}{'n/a':>10}"
        lines.append(f"{p['profile'][:17]:<18}{p['algo']:<6}{(p['codec'] or 'exact')[:13]:<14}{human(p['bytes']):>10}"
                     f"{t * 1e3:>10.2f}ms{busbw(p['bytes'], t, n):>8.4f}GB/s" + gcols)
    return "\n".join(lines)


def plot(points: list[dict[str, Any]], n: int, path: str) -> None:
    """busbw and time against size, one line per (profile, backend, algo, codec)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for p in points:
        key = f"{p['profile']} {p['backend']}" + (f" {p['algo']} {p['codec'] or 'exact'}" if p["backend"] == "zmq" else "")
        series.setdefault(key, []).append((p["bytes"], p["time_s"]))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, pts in sorted(series.items()):
        pts.sort()
        xs = [b for b, _ in pts]
        style = "--" if " gloo" in key else "-"
        a1.plot(xs, [busbw(b, t, n) for b, t in pts], style, marker="o", ms=3, label=key)
        a2.plot(xs, [t * 1e3 for _, t in pts], style, marker="o", ms=3, label=key)
    for ax, yl in ((a1, "busbw (GB/s)"), (a2, "time per all_reduce (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
    a2.legend(fontsize=6, loc="upper left")
    fig.suptitle(f"all_reduce, {n} ranks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
