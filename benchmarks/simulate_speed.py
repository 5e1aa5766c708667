"""The simulator's own cost: wall and CPU seconds of the fleet study's configuration (docs/simulate.md).

    python benchmarks/simulate_speed.py OUT.json [NODES=1024,4096] [TOPOLOGIES=ring,tree,ps,gossip:exponential] [ROUNDS=100]

Exact all-reduce of 1 MiB, ``mix:home-broadband=0.8,lte-phone=0.2``, churn (1 %, 50 %), shared access
links, 16 PS shards, no training model. Prints the machine line and the load average beside each point
(wall time on a shared machine is mostly other processes' time: compare CPU seconds).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from commlayer.adapt.cost import EXACT
from commlayer.sim.sweep import SweepConfig, run_point
from commlayer.testing.machine import machine_line


def main() -> int:
    out = sys.argv[1]
    sizes = [int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "1024,4096").split(",")]
    topos = (sys.argv[3] if len(sys.argv) > 3 else "ring,tree,ps,gossip:exponential").split(",")
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 100
    print(machine_line(), flush=True)
    cfg = SweepConfig("mix:home-broadband=0.8,lte-phone=0.2", 1 << 20, rounds=rounds, compute_s=1.0, churn=(0.01, 0.5),
                      contention="device", ps_servers=16, chunk_bytes=1 << 20, train=None)
    rows: list[dict[str, Any]] = []
    for n in sizes:
        for t in topos:
            l0 = os.getloadavg()[0]
            w, c = time.monotonic(), time.process_time()
            row = run_point(n, t, EXACT, cfg)
            r = {"nodes": n, "topology": t, "rounds": rounds, "wall_s": time.monotonic() - w, "cpu_s": time.process_time() - c,
                 "load1": [l0, os.getloadavg()[0]], "step_time_s": row["step_time_s"], "messages": row["messages"],
                 "round_end_s": row["round_end_s"], "bytes": row["bytes_per_device"], "energy": row["energy_per_device_J"]}
            rows.append(r)
            print(f"{n} {t:<20} wall {r['wall_s']:7.1f}s cpu {r['cpu_s']:7.1f}s load {l0:.1f}->{os.getloadavg()[0]:.1f} "
                  f"step {r['step_time_s']:.9f} msgs {r['messages']}", flush=True)
            with open(out, "w") as f:
                json.dump({"machine": machine_line(), "rows": rows}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
