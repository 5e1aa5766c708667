"""Simulator validation and fleet study (the figures of docs/simulate.md).

Part 1, ``--validate``: for each profile and world size, ring / tree / PS / gossip, exact and two
codecs, run for real (relay-emulated links, :func:`commlayer.sim.validate.measure`) and predicted
by the simulator (link contention, codec profiles measured here single-threaded). Prints the
predicted vs measured table with the machine's memcpy bandwidth and core count.

Part 2, ``--study``: a home-broadband + LTE fleet with churn at 1024 and 4096 nodes: which
topology and codec wins on step time, bytes, energy and time to target, and the sim's own CPU time.

    python benchmarks/simulate_validate.py --validate --sizes 4,8 --json validate.json --png validate.png
    python benchmarks/simulate_validate.py --study --nodes 1024,4096 --rounds 100 --json study.json --png study.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

PROFILES = ("wan-20mbit-50ms", "lte", "intercontinental")
TOPOLOGIES = ("ring", "tree", "ps", "gossip:ring")
CODECS = ("", "int8+ef", "topk:ratio=0.01+ef")
STUDY_TOPOLOGIES = ("ring", "tree", "ps", "ps-async", "gossip:exponential", "gossip:one_peer_exponential", "gossip:torus")


def _profiles(specs: tuple[str, ...]) -> list[Any]:
    import torch

    from commlayer.adapt.execute import measure_codec

    torch.set_num_threads(1)
    return [measure_codec(s) for s in specs]


def validate(args: argparse.Namespace) -> list[dict[str, Any]]:
    from commlayer.sim.consensus import consensus_curve
    import numpy as np

    from commlayer.sim.validate import measure, memcpy_GBps, predict

    codecs = _profiles(CODECS)
    rows: list[dict[str, Any]] = []
    for prof in args.profiles.split(","):
        for n in (int(x) for x in args.sizes.split(",")):
            configs = [(t, c.spec) for t in TOPOLOGIES for c in codecs if not (t.startswith("gossip") and c.spec)]
            t0 = time.monotonic()
            meas = measure(n, prof, configs, args.bytes, args.reps)
            mem = memcpy_GBps()
            for t, spec in configs:
                c = meas["codecs"][spec]
                pred = predict(n, prof, t, c, args.bytes)
                pred_single = predict(n, prof, t, meas["codecs_single"][spec], args.bytes)
                m = meas[f"{t}|{spec}"]
                row = {"profile": prof, "nodes": n, "topology": t, "codec": spec or "exact", "predicted_s": pred,
                       "predicted_single_s": pred_single, "encode_s": args.bytes / c.encode_Bps,
                       "decode_s": args.bytes / c.decode_Bps, "measured_s": m["median_s"], "reps_s": m["reps_s"],
                       "error": pred / m["median_s"] - 1, "memcpy_GBps": mem, "cores": os.cpu_count(),
                       "load1": meas["load1"]}
                if "consensus" in m:
                    sim = consensus_curve(t.split(":", 1)[1], n, len(m["consensus"]), x0=np.array(m["consensus_x0"]))
                    row["consensus_real"], row["consensus_sim"] = m["consensus"], sim["averaging"]
                rows.append(row)
                print(f"{prof:<18} {n:>3} {t:<12} {row['codec'][:14]:<14} pred {pred * 1e3:8.1f} ms  meas {m['median_s'] * 1e3:8.1f} ms "
                      f"{row['error']:+7.1%}  (one-rank cold codec profile: {pred_single * 1e3:7.1f} ms; memcpy {mem:.1f} GB/s, "
                      f"{os.cpu_count()} cores, load {meas['load1'][0]:.1f}-{meas['load1'][1]:.1f})", flush=True)
            print(f"# {prof} x {n}: {time.monotonic() - t0:.0f} s", flush=True)
    return rows


def study(args: argparse.Namespace) -> list[dict[str, Any]]:
    from commlayer.sim.sweep import SweepConfig, format_table, run_point

    codecs = _profiles(tuple(args.study_codecs.split(";")))
    cfg = SweepConfig(args.links, args.bytes, rounds=args.rounds, compute_s=args.compute_s, churn=(0.01, 0.5),
                      contention="device", ps_servers=args.ps_servers, chunk_bytes=1 << 20, train_rounds=300)
    rows = []
    for n in (int(x) for x in args.nodes.split(",")):
        for t in args.topologies.split(","):
            for c in codecs:
                if t == "ps-async" and c.spec:
                    continue
                w0 = time.monotonic()
                row = run_point(n, t, c, replace(cfg, rounds=min(args.rounds, args.ring_rounds) if t == "ring" else args.rounds))
                row["sim_wall_s"] = time.monotonic() - w0
                row.pop("round_end_s")
                rows.append(row)
                print(format_table([row]).splitlines()[-1] + f"  wall {row['sim_wall_s']:.1f}s rounds {row.get('rounds', '')}",
                      flush=True)
    return rows


def _plots(doc: dict[str, Any], png: str) -> None:
    from commlayer.sim.plot import plot_study, plot_validation

    if doc.get("validation"):
        plot_validation(doc["validation"], png)
        print(f"wrote {png}")
    if doc.get("study"):
        out = png.replace(".png", "_study.png")
        plot_study(doc["study"], out)
        print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--validate", action="store_true")
    ap.add_argument("--study", action="store_true")
    ap.add_argument("--profiles", default=",".join(PROFILES))
    ap.add_argument("--sizes", default="4,8")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bytes", type=int, default=1 << 20)
    ap.add_argument("--links", default="mix:home-broadband=0.8,lte-phone=0.2")
    ap.add_argument("--nodes", default="1024,4096")
    ap.add_argument("--topologies", default=",".join(STUDY_TOPOLOGIES))
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--study-codecs", default=";fp16;randomk:ratio=0.01+ef",
                    help="';'-separated; linear codecs ride every algorithm (non-linear ones are all-gathered: p payloads per device)")
    ap.add_argument("--ring-rounds", type=int, default=100, help="rounds for the ring (its O(p^2) messages per round)")
    ap.add_argument("--compute-s", type=float, default=1.0)
    ap.add_argument("--ps-servers", type=int, default=16)
    ap.add_argument("--json", default="simulate_validate.json")
    ap.add_argument("--png", default="", help="figure path (validation); the study's goes beside it with _study")
    ap.add_argument("--plot-only", default="", help="re-plot a JSON written before")
    args = ap.parse_args(argv)
    if args.plot_only:
        _plots(json.loads(Path(args.plot_only).read_text()), args.png or "simulate_validate.png")
        return 0
    if not (args.validate or args.study):
        ap.error("expected --validate and/or --study")
    doc: dict[str, Any] = {"argv": sys.argv[1:], "cores": os.cpu_count()}
    if args.validate:
        doc["validation"] = validate(args)
    if args.study:
        doc["study"] = study(args)
    Path(args.json).write_text(json.dumps(doc, indent=1))
    print(f"wrote {args.json}")
    if args.png:
        _plots(doc, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
