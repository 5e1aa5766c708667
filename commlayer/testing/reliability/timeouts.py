"""Timeouts: every kind of blocking call against a rank that stopped participating."""

from __future__ import annotations

import re
import time
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist

from commlayer.testing.reliability.harness import World, context, init_zmq

TIMEOUT_KINDS = ("all_reduce", "broadcast_from_stalled", "reduce", "all_gather", "all_gather_into_tensor",
                 "gather", "scatter", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
                 "barrier", "barrier_per_call", "async_wait_per_call", "recv", "irecv_wait_per_call")
PER_CALL_KINDS = {"barrier_per_call", "async_wait_per_call", "irecv_wait_per_call"}


def _work(w: Any) -> Any:
    """The Work of an async call (torch types it Optional)."""
    if w is None:
        raise RuntimeError("expected a Work from an async_op call, got None")
    return w


def _timeout_op(kind: str, group: Any, rank: int, world: int, t: float, stalled: int) -> None:
    x = torch.ones(1000)
    gsize = world
    per_call = timedelta(seconds=t)
    if kind == "all_reduce":
        dist.all_reduce(x, group=group)
    elif kind == "broadcast":
        dist.broadcast(x, src=0, group=group)
    elif kind == "broadcast_from_stalled":
        dist.broadcast(x, src=stalled, group=group)
    elif kind == "reduce":
        dist.reduce(x, dst=0, group=group)
    elif kind == "all_gather":
        dist.all_gather([torch.empty(1000) for _ in range(gsize)], x, group=group)
    elif kind == "all_gather_into_tensor":
        dist.all_gather_into_tensor(torch.empty(1000 * gsize), x, group=group)
    elif kind == "gather":
        dist.gather(x, [torch.empty(1000) for _ in range(gsize)] if rank == 0 else None, dst=0, group=group)
    elif kind == "scatter":
        dist.scatter(x, [torch.ones(1000) for _ in range(gsize)] if rank == 0 else None, src=0, group=group)
    elif kind == "reduce_scatter":
        dist.reduce_scatter(x, [torch.ones(1000) for _ in range(gsize)], group=group)
    elif kind == "reduce_scatter_tensor":
        dist.reduce_scatter_tensor(x, torch.ones(1000 * gsize), group=group)
    elif kind == "all_to_all":
        dist.all_to_all([torch.empty(10) for _ in range(gsize)], [torch.ones(10) for _ in range(gsize)], group=group)
    elif kind == "all_to_all_single":
        dist.all_to_all_single(torch.empty(10 * gsize), torch.ones(10 * gsize), group=group)
    elif kind == "barrier":
        dist.barrier(group=group)
    elif kind == "barrier_per_call":
        dist.barrier(group=group, timeout=per_call)
    elif kind == "async_wait_per_call":
        _work(dist.all_reduce(x, group=group, async_op=True)).wait(timeout=per_call)
    elif kind == "recv":
        dist.recv(x, src=stalled, tag=7, group=group)
    elif kind == "irecv_wait_per_call":
        _work(dist.irecv(x, src=stalled, tag=8, group=group)).wait(timeout=per_call)
    else:
        raise ValueError(kind)


def timeout_worker(rank: int, world: int, events: Any, kinds: Sequence[str], t: float, release: Any) -> dict:
    """Ranks 0..world-2 run each kind of operation on its own group; the last rank never joins them.

    Group kinds use a group created with ``timeout=t``; the per-call kinds use a group with a long
    timeout and pass ``t`` to the call. Afterwards the stalled rank sends two messages with the tag
    of the receives that timed out, to see where they land.
    """
    stalled = world - 1
    init_zmq(timeout=120.0)
    groups = {k: dist.new_group(list(range(world)), timeout=timedelta(seconds=120.0 if k in PER_CALL_KINDS else t)) for k in kinds}
    out: dict[str, Any] = {}
    if rank != stalled:
        for k in kinds:
            t0 = time.monotonic()
            try:
                _timeout_op(k, groups[k], rank, world, t, stalled)
                out[k] = ("no error", "", time.monotonic() - t0)
            except Exception as exc:
                out[k] = (type(exc).__name__, str(exc)[:400], time.monotonic() - t0)
        events.put((rank, "done", None))
    if rank in (0, stalled) and "recv" in kinds:
        release.wait(timeout=300.0)
        # Two messages with the tag of the receive that timed out: a fresh receive must get the first.
        g = groups["recv"]
        if rank == stalled:
            dist.send(torch.full((1000,), 42.0), dst=0, tag=7, group=g)
            dist.send(torch.full((1000,), 43.0), dst=0, tag=7, group=g)
        else:
            y = torch.zeros(1000)
            try:
                w = _work(dist.irecv(y, src=stalled, tag=7, group=g))
                w.wait(timeout=timedelta(seconds=10))
                out["late_recv_got"] = float(y[0])
            except Exception as exc:
                out["late_recv_got"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    else:
        release.wait(timeout=300.0)
    dist.destroy_process_group()
    return out


def run_timeouts(t: float = 1.0, world: int = 3, kinds: Sequence[str] = TIMEOUT_KINDS, margin: float = 2.0) -> dict:
    """Every kind of blocking call against a rank that stopped participating: CommTimeout within t + margin,
    naming the operation, the group and a peer."""
    release = context().Event()
    w = World(timeout_worker, world, kinds, t, release).start()
    try:
        w.wait_for("done", list(range(world - 1)), 120.0 + len(kinds) * (t + 10.0))
        release.set()
        res = w.wait_for("result", list(range(world)), 120.0)
    finally:
        release.set()
        leftovers = w.close(grace=15.0)
    rows = {}
    problems: list[str] = []
    for k in kinds:
        worst, row_problems, example = 0.0, [], ""
        for r in range(world - 1):
            if r not in res or res[r][0] != "result":
                row_problems.append(f"rank {r} did not report: {res.get(r, ('', 'hung'))[1][-300:]}")
                continue
            etype, msg, took = res[r][1][k]
            worst = max(worst, took)
            if etype == "CommTimeout":
                example = example or f"{etype}: {msg}"
            if etype == "no error":  # a rank that only sends to the stalled one may finish (as with gloo)
                pass
            elif etype != "CommTimeout":
                row_problems.append(f"rank {r}: {etype} {msg[:200]}")
            elif not (re.search(r"\brank \d\b", msg) and "group" in msg):
                row_problems.append(f"rank {r}: the message does not name a peer and the group: {msg[:200]}")
            if took > t + margin:
                row_problems.append(f"rank {r}: raised after {took:.2f} s (timeout {t} s + margin {margin} s)")
        if not example and not row_problems:
            row_problems.append("no rank raised CommTimeout")
        rows[k] = {"ok": not row_problems, "worst_s": round(worst, 2), "problems": row_problems, "example": example[:300]}
        problems += [f"{k}: {p}" for p in row_problems]
    late = res.get(0, ("", {}))[1].get("late_recv_got") if isinstance(res.get(0, ("", {}))[1], dict) else None
    if "recv" in kinds and late != 42.0:
        problems.append(f"a receive after a timed-out one got {late!r}, expected the first message sent after it (42.0)")
    return {"timeout_s": t, "margin_s": margin, "kinds": rows, "late_recv_got": late, "problems": problems,
            "hung_ranks": leftovers, "ok": sum(v["ok"] for v in rows.values()), "total": len(rows)}
