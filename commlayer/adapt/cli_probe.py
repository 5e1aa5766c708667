"""``commlayer probe``: measure every directed link among N local ranks (optionally emulated).

    commlayer probe --nproc 4 --links hetero          # emulated profile (relay mode)
    commlayer probe --nproc 2 --json                  # plain loopback, JSON lines
    commlayer probe --nproc 3 --links wan-20mbit-50ms --prometheus

Prints each directed link's measured one-way latency and bandwidth (and, on emulated links, the
configured values beside them). ``--json`` prints one ``{"event": "links", ...}`` object per link
(the format of the metrics files); ``--prometheus`` prints exposition text.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any, Sequence


def _rank_main(rank: int, world: int, envs: list[dict[str, str]], train_bytes: int, pings: int, q: Any) -> None:
    os.environ.update(envs[rank])
    from commlayer.adapt.estimator import LinkState
    from commlayer.adapt.probe import ProbeConfig, probe_links
    from commlayer.adapt.session import barrier, connect

    try:
        g = connect(rank, world, timeout=60)
        try:
            state = LinkState(rank, world)
            res = probe_links(g.transport, g.ranks, ProbeConfig(pings=pings, train_bytes=train_bytes), 1, state)
            barrier(g)
        finally:
            g.transport.close()
        q.put((rank, res.snapshot.as_dict(), [e.as_dict() for e in state.estimates()], None))
    except BaseException as exc:  # reported by the parent
        q.put((rank, None, None, f"{type(exc).__name__}: {exc}"))


def run_probe(nproc: int, links: str | None = None, train_bytes: int = 512 << 10, pings: int = 5,
              timeout: float = 120.0) -> tuple[list[dict[str, Any]], Any]:
    """Probes ``nproc`` local ranks; returns (rank 0's link estimates, the emulated LinkMatrix or None)."""
    import multiprocessing as mp
    import queue
    import socket

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with contextlib.ExitStack() as stack:
        matrix = None
        if links:
            from commlayer.wan import emulated_world

            w = stack.enter_context(emulated_world(nproc, links))
            envs, matrix = [w.env(r) for r in range(nproc)], w.links
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            envs = [{"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "COMMLAYER_HOST": "127.0.0.1"} for _ in range(nproc)]
        procs = [ctx.Process(target=_rank_main, args=(r, nproc, envs, train_bytes, pings, q), daemon=True) for r in range(nproc)]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        try:
            while len(results) < nproc:
                rank, snap, est, err = q.get(timeout=timeout)
                if err:
                    raise RuntimeError(f"rank {rank}: {err}")
                results[rank] = est
        except queue.Empty:
            raise TimeoutError(f"probe did not finish within {timeout:.0f} s") from None
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
            q.close()
    return results[0], matrix


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="commlayer probe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2, help="local ranks (default 2)")
    ap.add_argument("--links", default=None, help="emulate links: a profile name (commlayer.wan.PROFILES) or a link-matrix JSON")
    ap.add_argument("--train-bytes", type=int, default=512 << 10, help="bytes per bandwidth train (default 512 KiB)")
    ap.add_argument("--pings", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--json", action="store_true", help="JSON lines, one per directed link")
    ap.add_argument("--prometheus", action="store_true", help="Prometheus exposition text")
    args = ap.parse_args(argv)
    if args.nproc < 2:
        print(f"commlayer probe: expected --nproc >= 2, got {args.nproc}", file=sys.stderr)
        return 2
    try:
        est, matrix = run_probe(args.nproc, args.links, args.train_bytes, args.pings, args.timeout)
    except Exception as exc:
        print(f"commlayer probe: {exc}", file=sys.stderr)
        return 1
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
            line = f"{e['src']:>3} -> {e['dst']:<3} latency {e['latency_ms']:8.2f} ms   bandwidth {e['bandwidth_mbit']:9.2f} Mbit/s"
            if cfg is not None:
                line += f"   (emulated {cfg.delay_ms:.1f} ms, {cfg.rate_mbit:g} Mbit/s)"
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
