"""Codec micro-benchmark: compression ratio, encode/decode throughput, relative error.

Throughput is GB/s of float32 *input* (4 bytes per element), median of ``--repeats`` runs, on
one thread (``torch.set_num_threads(1)``) unless ``--threads`` says otherwise.

    .venv/bin/python benchmarks/codecs.py                     # 1M and 16M elements, all codecs
    .venv/bin/python benchmarks/codecs.py --sizes 1M --json results/codecs.json
    .venv/bin/python benchmarks/codecs.py --specs "topk:ratio=0.01,int8"
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Any

import torch

import commlayer.codecs as C

DEFAULT_SPECS = [
    "identity",
    "fp16",
    "bf16",
    "int8",
    "qsgd",
    "qsgd:levels=127",
    "terngrad",
    "sign",
    "topk:ratio=0.01",
    "topk:ratio=0.001",
    "randomk:ratio=0.01",
    "threshold:tau=2.5",
    "dgc:ratio=0.001",
    "topk:ratio=0.01|int8",
    "topk:ratio=0.01,index=delta|fp16|lz4",
    "powersgd:rank=4",
]


def _size(text: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * mult[text[-1].upper()]) if text[-1].upper() in mult else int(text)


def bench(spec: str, numel: int, repeats: int) -> dict[str, Any]:
    """Measures one codec on ``numel`` float32 elements of N(0, 1) data."""
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    # PowerSGD works on matrices: a square-ish view of the same data.
    shape = (1024, numel // 1024) if spec.startswith("powersgd") and numel % 1024 == 0 else (numel,)
    x = x.view(shape)
    codec = C.from_spec(spec)
    enc_t, dec_t = [], []
    enc = out = None
    for step in range(repeats + 1):
        ctx = C.CodecContext(shape, torch.float32, key="bench", step=step, seed=1)
        t0 = time.perf_counter()
        enc = codec.encode(x, ctx)
        t1 = time.perf_counter()
        out = codec.decode(enc, ctx)
        t2 = time.perf_counter()
        if step:  # first run warms up
            enc_t.append(t1 - t0)
            dec_t.append(t2 - t1)
    assert enc is not None and out is not None
    gb = numel * 4 / 1e9
    return {
        "spec": spec,
        "numel": numel,
        "bytes": enc.nbytes,
        "ratio": numel * 4 / max(1, enc.nbytes),
        "encode_gbps": gb / statistics.median(enc_t),
        "decode_gbps": gb / statistics.median(dec_t),
        "rel_error": float((out - x).norm() / x.norm()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1M,16M", help="comma-separated element counts (K/M suffixes)")
    ap.add_argument("--specs", default=None, help="comma-free list separated by ';' (default: all)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write results to this path")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    specs = args.specs.split(";") if args.specs else DEFAULT_SPECS
    rows = []
    print(f"{'codec':40s} {'elements':>9s} {'ratio':>8s} {'enc GB/s':>9s} {'dec GB/s':>9s} {'rel err':>8s}")
    for numel in (_size(s) for s in args.sizes.split(",")):
        for spec in specs:
            r = bench(spec, numel, args.repeats)
            rows.append(r)
            print(f"{spec:40s} {numel:>9d} {r['ratio']:8.1f} {r['encode_gbps']:9.2f} {r['decode_gbps']:9.2f} {r['rel_error']:8.4f}", flush=True)
    if args.json:
        meta = {"torch": torch.__version__, "python": sys.version.split()[0], "machine": platform.machine(), "threads": args.threads}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
