"""Prints the FSDP2 compression figures (final loss vs exact, bytes vs exact) on zmq and gloo.

    .venv/bin/python tests/clients/fsdp_compression_figures.py
"""

from __future__ import annotations

import os

import fsdp_compression  # the script's own folder is sys.path[0]

from commlayer.testing.launch import run_world

CODECS = ["", "bf16", "fp16", "int8", "topk:ratio=0.25+ef"]

if __name__ == "__main__":
    print(f"cores: {os.cpu_count()}; 2 ranks, 12 steps, MLP 32-64-4, one FSDP module")
    print(f"{'backend':<6} {'codec':<20} {'final loss':>11} {'vs exact':>9} {'wire/exact bytes':>17}")
    for backend in ("zmq", "gloo"):
        res = run_world(fsdp_compression.train_all, 2, backend, CODECS, timeout=280)[0]
        ref = res[""]["losses"][-1]
        for codec in CODECS:
            r = res[codec]
            ratio = (sum(s[2] for s in r["stats"]) / sum(s[3] for s in r["stats"])) if r["stats"] else 1.0
            print(f"{backend:<6} {codec or 'exact':<20} {r['losses'][-1]:>11.5f} {r['losses'][-1] / ref - 1:>+9.2%} {ratio:>17.3f}")
