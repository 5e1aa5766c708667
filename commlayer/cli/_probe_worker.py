"""One rank of the fallback ``commlayer probe`` (run by ``commlayer.wan.launch``).

Every directed link i->j is measured in turn (a barrier between links, so they do not compete):
``pings`` PING/PONG round trips over the zmq transport (median), then bulk DATA messages of growing
size from i to j, each acknowledged, until one takes > 0.25 s or reaches ``--bulk-bytes``;
bandwidth = bytes / (elapsed - RTT). Results are gathered to rank 0 as tensors (no pickle).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from commlayer.transport import envelope
from commlayer.transport.wire import Kind

_CH = "commlayer-probe"
_TIMEOUT_S = 60.0


def _ping(tr, rank: int, peer: int, n: int, seq0: int) -> float:  # type: ignore[no-untyped-def]
    rtts = []
    for k in range(n):
        t0 = time.perf_counter()
        tr.send(peer, envelope.control(Kind.PING, _CH, rank, seq=seq0 + k, meta={"t": t0}), [])
        tr.recv(_CH, seq0 + k, 0, 0, peer, _TIMEOUT_S)
        rtts.append(time.perf_counter() - t0)
    return statistics.median(rtts)


def _bulk_send(tr, rank: int, peer: int, rtt: float, max_bytes: int, seq0: int) -> float:  # type: ignore[no-untyped-def]
    size, best, k = 64 << 10, 0.0, 0
    while True:
        payload = bytes(size)
        t0 = time.perf_counter()
        tr.send(peer, envelope.data("probe-bulk", _CH, seq0 + k, rank), [payload])
        tr.recv(_CH, seq0 + k, 1, 0, peer, _TIMEOUT_S)  # the receiver's ack
        el = time.perf_counter() - t0
        best = max(best, size * 8 / max(el - rtt, 1e-6) / 1e6)
        k += 1
        if el > 0.25 or size >= max_bytes or k >= 12:
            tr.send(peer, envelope.data("probe-bulk", _CH, seq0 + k, rank, meta={"done": 1}), [])
            return best
        size = min(max_bytes, size * 4)


def _bulk_recv(tr, rank: int, peer: int, seq0: int) -> None:  # type: ignore[no-untyped-def]
    for k in range(64):
        msg = tr.recv(_CH, seq0 + k, 0, 0, peer, _TIMEOUT_S)
        if msg.header.meta.get("done"):
            return
        tr.send(peer, envelope.data("probe-ack", _CH, seq0 + k, rank, step=1), [])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pings", type=int, default=5)
    ap.add_argument("--bulk-bytes", type=int, default=1 << 20)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    dist.init_process_group("zmq", timeout=timedelta(seconds=120))
    rank, n = dist.get_rank(), dist.get_world_size()
    tr = dist.group.WORLD.transport
    rtt = torch.zeros(n, dtype=torch.float64)
    bw = torch.zeros(n, dtype=torch.float64)
    seq = 0
    try:
        for i in range(n):
            for j in range(n):
                if i == j:
                    continue
                seq += 1000
                if rank == i:
                    rtt[j] = _ping(tr, rank, j, args.pings, seq)
                    bw[j] = _bulk_send(tr, rank, j, float(rtt[j]), args.bulk_bytes, seq + 500)
                elif rank == j:
                    _bulk_recv(tr, rank, i, seq + 500)
                dist.barrier()
                if rank == 0:
                    print(f"  link {i}->{j} done", flush=True)
        rows_rtt = [torch.zeros(n, dtype=torch.float64) for _ in range(n)]
        rows_bw = [torch.zeros(n, dtype=torch.float64) for _ in range(n)]
        dist.all_gather(rows_rtt, rtt)
        dist.all_gather(rows_bw, bw)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        from commlayer.cli.probe import format_matrix, write_json
        rtt_ms = [[float(x) * 1e3 for x in r] for r in rows_rtt]
        mbit = [[float(x) for x in r] for r in rows_bw]
        print(format_matrix("RTT (ms), median of %d pings over the zmq transport:" % args.pings, rtt_ms, ".2f"))
        print(format_matrix("bandwidth (Mbit/s), bulk transfer, RTT subtracted:", mbit, ".1f"))
        if args.json:
            write_json(args.json, rtt_ms, mbit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
