"""``commlayer simulate``: fleet-scale topology experiments in minutes, validated against real runs.

    commlayer simulate --nodes 64,1024 --topology ring,tree,ps,gossip:exponential --codec ';int8+ef' \\
        --links mix:home-broadband=0.9,lte-phone=0.1 --bytes 4M --rounds 20 --churn 0.01,0.5 --contention device
    commlayer simulate --nodes 4 --topology ring,tree,ps,gossip --links wan-20mbit-50ms --bytes 1M --validate

Prints a sweep table (step time, bytes/device, energy/device, time to target), writes JSON and a
PNG. ``--validate`` runs the same configurations for real (relay-mode emulated links, nodes <= 16)
and prints predicted vs measured side by side. Details: docs/simulate.md.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from commlayer.cli._common import CliError, Progress, parse_size


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("simulate", help="discrete-event simulation of ring/tree/PS/gossip at fleet scale",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", default="4", help="comma-separated world sizes")
    p.add_argument("--topology", default="ring,tree,ps,gossip", help="ring,tree,chain,ps,ps-async,gossip[:GRAPH]")
    p.add_argument("--codec", default="", help="';'-separated codec specs (empty = exact), measured on this machine")
    p.add_argument("--links", default="wan-20mbit-50ms", help="profile, link-matrix file, or mix:CLASS=FRAC,...")
    p.add_argument("--bytes", default="1M", help="gradient bytes per node")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--compute-s", type=float, default=0.0, help="compute seconds per round on a speed-1 device")
    p.add_argument("--period", type=int, default=1, help="sync every H rounds (local SGD / DiLoCo)")
    p.add_argument("--churn", default="", help="LEAVE,REJOIN per-round probabilities (e.g. 0.01,0.5)")
    p.add_argument("--contention", choices=["link", "device"], default=None,
                   help="link: independent links (the emulator); device: shared access links (default above 64 nodes)")
    p.add_argument("--ps-servers", type=int, default=1)
    p.add_argument("--chunk-bytes", default="1M")
    p.add_argument("--no-train", action="store_true", help="skip the time-to-target model")
    p.add_argument("--validate", action="store_true", help="also run each configuration for real (nodes <= 16)")
    p.add_argument("--reps", type=int, default=3, help="--validate: timed operations per configuration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="simulate.json")
    p.add_argument("--png", default="simulate.png")
    p.set_defaults(func=run)


def _codecs(text: str) -> list[Any]:
    import torch

    from commlayer.adapt.execute import measure_codec

    torch.set_num_threads(1)  # as every rank runs (torchrun's OMP_NUM_THREADS=1); threads on a loaded host cost 20x

    specs = text.split(";") if ";" in text else text.split(",")
    out = []
    for s in specs:
        try:
            out.append(measure_codec(s.strip()))
        except ValueError as exc:
            raise CliError(f"--codec {s!r}: {exc}") from None
    return out


def run(args: argparse.Namespace) -> int:
    from commlayer.sim.plot import plot_sweep
    from commlayer.sim.scenario import Scenario
    from commlayer.sim.sweep import SweepConfig, format_table, run_sweep
    from commlayer.sim.train import TrainConfig
    from commlayer.wan import LinkConfigError

    try:
        nodes = [int(x) for x in args.nodes.split(",") if x]
    except ValueError:
        raise CliError(f"--nodes: expected comma-separated integers, got {args.nodes!r}") from None
    if not nodes or min(nodes) < 2:
        raise CliError(f"--nodes: expected sizes >= 2, got {args.nodes!r}")
    topologies = [t for t in args.topology.split(",") if t]
    for t in topologies:
        try:
            Scenario(t, 4).check()
        except ValueError as exc:
            raise CliError(f"--topology: {exc}") from None
    churn = None
    if args.churn:
        try:
            leave, rejoin = (float(x) for x in args.churn.split(","))
        except ValueError:
            raise CliError(f"--churn: expected LEAVE,REJOIN, got {args.churn!r}") from None
        churn = (leave, rejoin)
    codecs = _codecs(args.codec)
    contention = args.contention or ("device" if max(nodes) > 64 else "link")
    cfg = SweepConfig(args.links, parse_size(args.bytes), args.rounds, args.compute_s, args.period, churn, contention,
                      parse_size(args.chunk_bytes), args.ps_servers, seed=args.seed,
                      train=None if args.no_train else TrainConfig(seed=args.seed))
    bar = Progress(len(nodes) * len(topologies) * len(codecs), "simulate")
    try:
        rows = run_sweep(nodes, topologies, codecs, cfg, progress=lambda note: bar.update(1, note))
    except LinkConfigError as exc:
        raise CliError(f"--links: {exc}") from None
    print(format_table(rows))
    doc: dict[str, Any] = {"config": {**vars(args), "func": None, "contention": contention}, "rows": rows}
    if args.validate:
        doc["validation"] = _validate(args, nodes, topologies, codecs, cfg)
    Path(args.json).write_text(json.dumps(doc, indent=1, default=str))
    plot_sweep(rows, args.png, doc.get("validation"))
    print(f"wrote {args.json} and {args.png}")
    return 0


def _validate(args: argparse.Namespace, nodes: list[int], topologies: list[str], codecs: list[Any], cfg: Any) -> list[dict]:
    from commlayer.sim.consensus import consensus_curve
    from commlayer.sim.validate import measure, memcpy_GBps, predict

    if max(nodes) > 16:
        raise CliError(f"--validate: expected --nodes <= 16 (real processes on this machine), got {max(nodes)}")
    print(f"# validation: real ranks on relay-emulated links; memcpy {memcpy_GBps():.1f} GB/s, {os.cpu_count()} cores")
    print(f"{'nodes':>5} {'topology':<22} {'codec':<12} {'predicted':>10} {'measured':>10} {'error':>7}")
    out = []
    for n in nodes:
        configs = [(t, c.spec) for t in topologies for c in codecs
                   if not (t.startswith("gossip") and c.spec) and t != "ps-async"]
        meas = measure(n, args.links, configs, cfg.nbytes, args.reps, cfg.chunk_bytes)
        for t, spec in configs:
            prof = meas["codecs"][spec]  # as the ranks measured it, sharing this machine's cores
            pred = predict(n, args.links, t, prof, cfg.nbytes, cfg.chunk_bytes)
            m = meas[f"{t}|{spec}"]
            row = {"nodes": n, "topology": t, "codec": spec or "exact", "predicted_s": pred, "measured_s": m["median_s"],
                   "reps_s": m["reps_s"], "error": pred / m["median_s"] - 1}
            if "consensus" in m:
                import numpy as np

                graph = t.split(":", 1)[1] if ":" in t else "ring"
                sim = consensus_curve(graph, n, len(m["consensus"]), x0=np.array(m["consensus_x0"]))
                row["consensus_real"], row["consensus_sim"] = m["consensus"], sim["averaging"]
            out.append(row)
            print(f"{n:>5} {t[:22]:<22} {row['codec'][:12]:<12} {pred * 1e3:>8.1f}ms {m['median_s'] * 1e3:>8.1f}ms "
                  f"{row['error']:>+6.1%}")
    return out
