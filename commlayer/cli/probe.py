"""``commlayer probe``: each directed link's measured latency and bandwidth among N local ranks.

    commlayer probe --nproc 4 --links hetero            # emulated profile: configured values beside
    commlayer probe --nproc 2 --json                    # plain loopback, JSON lines
    commlayer probe --nproc 3 --links wan-20mbit-50ms --prometheus

The ranks run the measurement layer's collective probe (:func:`commlayer.adapt.probe.probe_links`:
``--pings`` PING/PONG round trips and a ``--train-bytes`` packet train on every directed link, all
ranks agreeing on the result) over a bare zmq transport, behind the WAN emulator's relays when
``--links`` names a profile or a link-matrix file (relay mode: it shapes commlayer's transport,
which is what is measured). ``--json`` prints one ``{"event": "links", ...}`` object per link (the
format of the metrics files); ``--prometheus`` prints exposition text. A bandwidth the probe could
only bound from below (its trains stayed too short on this host, see :mod:`commlayer.adapt.probe`)
is printed as ``>= X`` and carries ``"lower_bound": true`` in JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from typing import Any

from commlayer.cli._common import CliError, check_links, check_nproc, parse_size


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("probe", help="measure each link's latency and bandwidth", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="local ranks (default %(default)s)")
    p.add_argument("--links", default="none", help="profile or link-matrix file to emulate; 'none' (default) = plain loopback")
    p.add_argument("--pings", type=int, default=5, help="round trips per link (default %(default)s)")
    p.add_argument("--train-bytes", default="512K", help="bytes per bandwidth train (default %(default)s)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds for the whole probe (default %(default)s)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="JSON lines, one per directed link")
    out.add_argument("--prometheus", action="store_true", help="Prometheus exposition text")
    p.set_defaults(func=run)


def _rank_main(rank: int, world: int, train_bytes: int, pings: int, timeout: float) -> list[dict[str, Any]]:
    """One rank: probe every link, return this rank's estimates (as dicts)."""
    from commlayer.adapt.estimator import LinkState
    from commlayer.adapt.probe import ProbeConfig, probe_links
    from commlayer.adapt.session import barrier, connect

    g = connect(rank, world, timeout=timeout)
    try:
        state = LinkState(rank, world)
        res = probe_links(g.transport, g.ranks, ProbeConfig(pings=pings, train_bytes=train_bytes, timeout=timeout), 1, state)
        barrier(g)
    finally:
        g.transport.close()
    lower = res.snapshot.meta.get("lower_bound")
    return [{**e.as_dict(), "lower_bound": bool(lower[e.src][e.dst]) if lower else False} for e in state.estimates()]


def run_probe(nproc: int, links: str | None = None, train_bytes: int = 512 << 10, pings: int = 5,
              timeout: float = 120.0) -> tuple[list[dict[str, Any]], Any]:
    """Probes ``nproc`` local ranks; returns (rank 0's link estimates, the emulated LinkMatrix or None)."""
    from commlayer.testing import run_world

    with contextlib.ExitStack() as stack:
        matrix, envs = None, None
        if links:
            from commlayer.wan import emulated_world

            w = stack.enter_context(emulated_world(nproc, links))
            envs, matrix = [w.env(r) for r in range(nproc)], w.links
        per_rank = run_world(_rank_main, nproc, train_bytes, pings, timeout / 2, env={"COMMLAYER_HOST": "127.0.0.1"},
                             envs=envs, timeout=timeout)
    return per_rank[0], matrix


def run(args: argparse.Namespace) -> int:
    import sys

    check_nproc(args.nproc)
    if args.nproc < 2:
        raise CliError(f"--nproc: expected >= 2 ranks to have links, got {args.nproc}")
    if args.pings < 1:
        raise CliError(f"--pings: expected >= 1, got {args.pings}")
    links = None if args.links == "none" else args.links
    if links is not None:
        check_links(links, args.nproc)
    try:
        est, matrix = run_probe(args.nproc, links, parse_size(args.train_bytes), args.pings, args.timeout)
    except (AssertionError, TimeoutError) as exc:
        raise CliError(f"the probe failed: {exc}") from None
    if args.prometheus:
        from commlayer.adapt.metrics import prometheus_text

        sys.stdout.write(prometheus_text(est))
        return 0
    for e in est:
        cfg = matrix.link(e["src"], e["dst"]) if matrix is not None else None
        if args.json:
            rec = {"event": "links", **e}
            if cfg is not None:
                rec.update(configured_latency_ms=cfg.delay_ms, configured_mbit=cfg.rate_mbit)
            print(json.dumps(rec))
        else:
            bound = ">=" if e.get("lower_bound") else "  "
            line = (f"{e['src']:>3} -> {e['dst']:<3} latency {e['latency_ms']:8.2f} ms   bandwidth {bound}{e['bandwidth_mbit']:9.2f} "
                    f"Mbit/s")
            if cfg is not None:
                line += f"   (emulated {cfg.delay_ms:.1f} ms, {cfg.rate_mbit:g} Mbit/s)"
            print(line)
    return 0
