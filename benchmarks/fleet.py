"""Figures of elastic fleets (issue 14; report in docs/fleet.md).

Parts (``--parts``, default all):

* ``churn``: 8 devices, every 10 rounds a random device leaves (clean or SIGKILL, by coin) and a
  new one joins, 200 rounds; against a fixed 8-device run with the same seed, side by side, for
  ``--seeds`` seeds (task and schedule): median final loss ratio (target within 2 %), lost and
  duplicated updates (target 0), replica digest mismatches.
* ``straggler``: one of 8 devices 5x slower (elastic rounds) vs the 7 fast devices alone and vs the
  fixed world (every round waits for everyone): median seconds per round, ratios (target <= 1.2x).
* ``catchup``: a joiner fetches the state of a 5M-parameter model (params + outer momentum, 40 MB)
  from a live peer over a 20 Mbit/s link (two network namespaces, tbf on the veth; root needed),
  and again after the transfer is cut halfway (resumed from a second replica).
* ``ps``: SIGKILL of a parameter server: seconds from the kill to the workers' first step served by
  the replica (at least 5 runs: median, max), and to the clear error without a replica.

The header prints the machine line (cores, load, memcpy bandwidth); every figure is a ratio or median of runs
made side by side on this (shared, loaded) machine.

    python benchmarks/fleet.py [--parts churn,straggler,catchup,ps] [--seeds 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from commlayer.testing.machine import machine_line
from commlayer.fleet.schedule import Schedule, run


def churn(work: Path, a: argparse.Namespace) -> dict:
    quick, seeds = a.quick, a.seeds
    """Per seed (the task's model, teacher and data, and the churn schedule): a fixed run, a churning run, and a
    fixed run drawing other samples (the data's own spread), side by side. Devices draw samples by fleet slot,
    round and step (a joiner draws what the leaver would have): the churn ratio measures churn, not the draw."""
    rounds = 60 if quick else 200
    per_seed = []
    for seed in range(1, seeds + 1):
        lr, mom = a.outer.split(",")
        args = ("--period", "5", "--seed", str(seed), "--outer-lr", lr, "--outer-momentum", mom)
        base = dict(devices=8, rounds=rounds, step_sleep=0.03, seed=seed, slot_data=True)
        fixed = run(Schedule(churn_every=0, job=f"fixed{seed}", args=args, **base), work / f"fixed{seed}")  # type: ignore[arg-type]
        elastic = run(Schedule(churn_every=10, job=f"churn{seed}", args=args, **base), work / f"churn{seed}")  # type: ignore[arg-type]
        other = run(Schedule(churn_every=0, job=f"other{seed}", args=(*args, "--data-seed", str(1000 + seed)), **base),  # type: ignore[arg-type]
                    work / f"other{seed}")
        per_seed.append({"seed": seed, "fixed_loss": fixed.final_loss, "churn_loss": elastic.final_loss,
                         "loss_ratio": elastic.final_loss / fixed.final_loss,
                         "fixed_other_data_ratio": other.final_loss / fixed.final_loss, "events": len(elastic.events),
                         "killed": sum(e["how"] == "killed" for e in elastic.events),
                         "event_rounds": [e["round"] for e in elastic.events], "audit_churn": elastic.audit,
                         "audit_fixed": fixed.audit,
                         "join_s_median": statistics.median(elastic.join_s) if elastic.join_s else None,
                         "wall_s": {"fixed": fixed.wall_s, "churn": elastic.wall_s}, "load": os.getloadavg()[0]})
        print(json.dumps({"churn_seed": per_seed[-1]}, default=str), flush=True)
    ratios = [p["loss_ratio"] for p in per_seed]
    return {"rounds": rounds, "seeds": seeds, "outer_lr,momentum": a.outer, "loss_ratio_median": statistics.median(ratios), "loss_ratio_max": max(ratios),
            "fixed_other_data_ratio_median": statistics.median(p["fixed_other_data_ratio"] for p in per_seed),
            "per_seed": per_seed}


def straggler(work: Path, a: argparse.Namespace) -> dict:
    quick = a.quick
    rounds = 30 if quick else 60
    base = dict(rounds=rounds, step_sleep=0.02, churn_every=0, seed=2, args=("--period", "5"))
    fast7 = run(Schedule(devices=7, job="fast7", **base), work / "fast7")  # type: ignore[arg-type]
    elastic = run(Schedule(devices=8, slow=1, job="strag", **base), work / "strag")  # type: ignore[arg-type]
    fixed = run(Schedule(devices=8, slow=1, close="all", job="stragall", **base), work / "stragall")  # type: ignore[arg-type]
    return {"rounds": rounds, "round_s": {"7 fast alone": fast7.round_s, "8 with 1 slow, elastic": elastic.round_s,
                                          "8 with 1 slow, fixed world": fixed.round_s},
            "elastic_vs_fast7": elastic.round_s / fast7.round_s, "fixed_vs_fast7": fixed.round_s / fast7.round_s,
            "late_folded": elastic.late_folded, "loss": {"fast7": fast7.final_loss, "elastic": elastic.final_loss,
                                                         "fixed": fixed.final_loss},
            "audit": {"elastic": elastic.audit, "fixed": fixed.audit}}


_SERVER = r'''
import sys, time, torch
from commlayer.fleet.statesync import StateServer
from commlayer.fleet.state import OuterState
st = OuterState.initial(torch.randn(int(sys.argv[1]), generator=torch.Generator().manual_seed(0)))
srv = StateServer(int(sys.argv[3]), b"k" * 32, sys.argv[2])
srv.publish(st)
print(srv.endpoint, srv.public, st.digest(), flush=True)
time.sleep(float(sys.argv[4]))
'''
_CLIENT = r'''
import json, sys, time
from commlayer.fleet.statesync import FetchFailed, Partial, fetch_from
eps = json.loads(sys.argv[1]); cut = int(sys.argv[2])
partial, t0, log = Partial(), time.monotonic(), []
for i, (ep, pub, peer) in enumerate(eps):
    try:
        st = fetch_from(ep, peer, pub, b"k" * 32, partial, stall=10.0,
                        on_chunk=(lambda k: (_ for _ in ()).throw(FetchFailed("cut")) if i == 0 and cut and len(partial.chunks) >= cut else None))
        break
    except FetchFailed as exc:
        log.append(str(exc))
print(json.dumps({"s": time.monotonic() - t0, "digest": st.digest(), "from": partial.fetched_from, "log": log}), flush=True)
'''


def catchup(work: Path, a: argparse.Namespace) -> dict:
    if os.geteuid() != 0 or shutil.which("tc") is None:
        return {"skipped": "needs root and tc for the 20 Mbit/s namespaces"}
    n = 5_000_000
    ns_a, ns_b, va, vb = "fleetbench-a", "fleetbench-b", "vfleetba", "vfleetbb"
    sh = lambda *c: subprocess.run(c, check=True, capture_output=True, timeout=20)  # noqa: E731
    for ns in (ns_a, ns_b):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
    procs: list[subprocess.Popen] = []
    try:
        sh("ip", "netns", "add", ns_a)
        sh("ip", "netns", "add", ns_b)
        sh("ip", "link", "add", va, "netns", ns_a, "type", "veth", "peer", "name", vb, "netns", ns_b)
        for ns, dev, ip in ((ns_a, va, "10.79.0.1"), (ns_b, vb, "10.79.0.2")):
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", dev, "up")
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", "20mbit", "burst", "32kbit",
               "latency", "400ms")
        eps = []
        for peer in (1, 2):
            p = subprocess.Popen(["ip", "netns", "exec", ns_a, sys.executable, "-c", _SERVER, str(n), "10.79.0.1", str(peer), "400"],
                                 stdout=subprocess.PIPE, text=True)
            procs.append(p)
            assert p.stdout is not None
            ep, pub, digest = p.stdout.readline().split()
            eps.append((ep, pub, peer))
        out = {}
        for label, cut in (("whole", 0), ("cut at half, resumed on a second replica", 20)):
            r = subprocess.run(["ip", "netns", "exec", ns_b, sys.executable, "-c", _CLIENT, json.dumps(eps), str(cut)],
                               capture_output=True, text=True, timeout=300)
            res = json.loads(r.stdout.strip().splitlines()[-1])
            res["ok"] = res.pop("digest") == digest
            out[label] = res
        ideal = (8 * n + 100) * 8 / 20e6
        return {"params": n, "state_bytes": 8 * n, "link": "20 Mbit/s tbf", "ideal_s": ideal, **out}
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def ps_failover(work: Path, a: argparse.Namespace) -> dict:
    quick, seeds = a.quick, a.seeds
    from commlayer.testing.ps_failover import run as failover_run  # the test's ranks: one server, one replica, two workers

    times = []
    for _ in range(1 if quick else max(5, seeds)):
        killed, res = failover_run(replica=True)
        times.append(max(res[w]["failover_done"] for w in (1, 2)) - killed)
    killed, res = failover_run(replica=False)
    return {"failover_s": times, "failover_s_median": statistics.median(times), "failover_s_max": max(times),
            "no_replica_error_s": max(res[w]["at"] for w in (1, 2)) - killed,
            "no_replica_error": res[1].get("error", "")[:200]}


PARTS = {"churn": churn, "straggler": straggler, "catchup": catchup, "ps": ps_failover}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=3, help="churn: seeds (fixed + churning run each); ps: at least 5 runs")
    ap.add_argument("--outer", default="1,0", help="churn: outer learning rate,momentum (1,0: plain averaging; DiLoCo: 0.7,0.9)")
    ap.add_argument("--out", default="", help="also write the JSON report here")
    a = ap.parse_args()
    torch.set_num_threads(1)
    report: dict = {"machine": machine_line()}
    print(json.dumps(report), flush=True)
    work = Path(tempfile.mkdtemp(prefix="commlayer-fleet-bench-"))
    for part in a.parts.split(","):
        t0 = time.monotonic()
        report[part] = PARTS[part](work / part, a)
        report[part]["bench_s"] = time.monotonic() - t0
        print(json.dumps({part: report[part]}, default=str), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
