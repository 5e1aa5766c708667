"""``commlayer probe``: each link's measured latency and bandwidth.

Dispatches to the measurement layer (``commlayer.adapt.cli_probe.main``) when it exists; until
then a minimal fallback runs here: N ranks (on emulated links unless ``--links none``) measure every
directed link in turn with the zmq transport's PING/PONG (median round trip) and a bulk transfer
(bandwidth = bytes / (elapsed - RTT)), and rank 0 prints the matrices.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from commlayer.cli._common import CliError, check_links, check_nproc

logger = logging.getLogger(__name__)


def dispatch(argv: list[str]) -> int:
    """Runs the measurement layer's probe if importable, else the fallback below."""
    try:
        mod = importlib.import_module("commlayer.adapt.cli_probe")
    except ImportError:
        mod = None
    if mod is not None and hasattr(mod, "main") and "--fallback" not in argv:
        return int(mod.main(argv))
    argv = [a for a in argv if a != "--fallback"]
    ap = argparse.ArgumentParser(prog="commlayer probe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_args(ap)
    args = ap.parse_args(argv)
    try:
        return run(args)
    except CliError as exc:
        print(f"commlayer probe: error: {exc}", file=sys.stderr)
        return 2


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=2, help="number of ranks (default %(default)s)")
    p.add_argument("--links", default="wan-20mbit-50ms", help="profile or link-matrix file; 'none' for plain loopback")
    p.add_argument("--mode", choices=["relay", "netns"], default="relay")
    p.add_argument("--pings", type=int, default=5, help="pings per link (median reported)")
    p.add_argument("--bulk-bytes", default="1M", help="largest bulk transfer per link (default %(default)s)")
    p.add_argument("--json", help="also write the matrices here")
    p.add_argument("--timeout", type=float, default=120.0)


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("probe", help="measure each link's latency and bandwidth")
    _add_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from commlayer.cli._common import parse_size
    from commlayer.wan import launch

    check_nproc(args.nproc)
    if args.nproc < 2:
        raise CliError(f"--nproc: expected >= 2 ranks to have links, got {args.nproc}")
    links = "datacenter" if args.links == "none" else args.links
    matrix = check_links(links, args.nproc)
    wargs = ["--pings", str(args.pings), "--bulk-bytes", str(parse_size(args.bulk_bytes))]
    if args.json:
        wargs += ["--json", args.json]
    print(f"probing {args.nproc} ranks on {matrix.name} ({args.mode} mode) ...", flush=True)
    script = importlib.import_module("commlayer.cli._probe_worker").__file__
    assert script is not None
    return launch(args.nproc, matrix, script, wargs, mode=args.mode, timeout_s=args.timeout, out=_Rank0Only(sys.stdout))


class _Rank0Only:
    """Forwards rank 0's lines without the ``[rank 0]`` prefix; other ranks only on errors."""

    def __init__(self, out) -> None:  # type: ignore[no-untyped-def]
        self.out = out

    def write(self, s: str) -> int:
        if s.startswith("[rank 0] "):
            self.out.write(s[len("[rank 0] "):])
        elif "Error" in s or "Traceback" in s:
            self.out.write(s)
        return len(s)

    def flush(self) -> None:
        self.out.flush()


def format_matrix(title: str, values: list[list[float]], fmt: str) -> str:
    """An N x N table, row = source, column = destination; '-' on the diagonal."""
    n = len(values)
    lines = [title, "src\\dst " + "".join(f"{j:>10}" for j in range(n))]
    for i in range(n):
        cells = "".join(f"{'-':>10}" if i == j else f"{format(values[i][j], fmt):>10}" for j in range(n))
        lines.append(f"{i:>7} " + cells)
    return "\n".join(lines)


def write_json(path: str, rtt_ms: list[list[float]], mbit: list[list[float]]) -> None:
    with open(path, "w") as f:
        json.dump({"rtt_ms": rtt_ms, "bandwidth_mbit": mbit}, f, indent=1)
