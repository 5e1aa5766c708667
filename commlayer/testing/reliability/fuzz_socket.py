"""Malformed frames into a live rank's TCP socket while the ranks keep running verified collectives."""

from __future__ import annotations

import os
import random
import socket
import time
from typing import Any

import torch
import torch.distributed as dist

from commlayer.testing.reliability.fuzz import deep_header, fuzz_message
from commlayer.testing.reliability.harness import World, census, world_transport, context, init_zmq, remove_stale_ipc

def fuzz_serve_worker(rank: int, world: int, events: Any, stop: Any, ticks: Any, expect_rejected: Any, limit: float) -> dict:
    """A rank that keeps running verified collectives while the parent attacks rank 1's socket."""
    init_zmq(timeout=60.0)
    tr = world_transport()
    # The attacker is an insider (it holds rank 0's job credentials), so its garbage passes the
    # ZeroMQ handshake and reaches commlayer's validation; a stranger never gets that far.
    pw = tr.creds.passwords[0] if tr.creds.passwords is not None else ""
    events.put((rank, "ready", {"tcp": tr.endpoint.tcp, "pid": os.getpid(), "password": pw}))
    wrong: list[str] = []
    t_end = time.monotonic() + limit
    i = 0
    for i in range(1, 10**7):
        flag = torch.tensor([1 if (rank == 0 and (stop.is_set() or time.monotonic() > t_end)) else 0])
        x = torch.full((1000 + i % 7,), float(rank + 1 + i))
        dist.all_reduce(x)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        want = float(sum(r + 1 + i for r in range(world)))
        if not bool((x == want).all()):
            wrong.append(f"iteration {i}: all_reduce gave {x[0].item()}, expected {want}")
        b = torch.full((3,), float(i)) if rank == i % world else torch.zeros(3)
        dist.broadcast(b, src=i % world)
        if not bool((b == i).all()):
            wrong.append(f"iteration {i}: broadcast gave {b.tolist()}")
        ticks[rank] = i
        if flag.item():
            break
    settle = time.monotonic() + 15.0  # let the transport read whatever the attacker left queued
    while rank == 1 and tr.rejected < expect_rejected.value and time.monotonic() < settle:
        time.sleep(0.05)  # the idle I/O thread reads the socket now
    out = {"iterations": i, "wrong": wrong[:5], "rejected": tr.rejected, "census": census()}
    dist.destroy_process_group()
    return out


def _rogue_socket(ctx: Any, target: str, ident: bytes | None, password: str = "") -> Any:
    import zmq

    s = ctx.socket(zmq.DEALER)
    if password:
        s.plain_username, s.plain_password = b"r0", password.encode()
    if ident is not None:
        s.setsockopt(zmq.ROUTING_ID, ident)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDTIMEO, 10_000)
    s.setsockopt(zmq.SNDHWM, 1000)
    s.connect(target)
    return s


def fuzz_socket(n: int, seed: int, world: int = 2, deep: bool = True, big_frames: int = 8, raw_conns: int = 50,
                time_limit: float = 540.0, deep_every: int = 0) -> dict:
    """Sends ``n`` malformed messages to a live rank over its real TCP socket while the ranks keep
    running verified collectives.

    The attacker uses fresh identities, the target's own identity and a live peer's identity
    (ZeroMQ drops the latter: identities are first come, first served), sends ``big_frames``
    garbage messages of 8 MiB, and opens ``raw_conns`` TCP connections that speak no ZMTP at all.
    With ``deep=False`` the headers nested ~1000 levels deep (see docs/reliability.md) are left out;
    ``deep_every=k`` makes every k-th message one of them.

    Returns crash/hang/wrong-result counts, rejections, and the target's RSS, fds and threads.
    """
    import zmq

    ctx_mp = context()
    stop, ticks, expect = ctx_mp.Event(), ctx_mp.Array("q", world, lock=False), ctx_mp.Value("q", 10**12, lock=False)
    w = World(fuzz_serve_worker, world, stop, ticks, expect, time_limit + 60.0, env={"COMMLAYER_HEARTBEAT": "2"}).start()
    rng = random.Random(seed)
    out: dict[str, Any] = {"messages": 0, "crashes": 0, "hangs": 0, "wrong_results": 0}
    zctx = zmq.Context()
    socks: list[Any] = []
    try:
        ready = w.wait_for("ready", list(range(world)), 120.0)
        if len(ready) < world or any(k != "ready" for k, _ in ready.values()):
            raise RuntimeError(f"fuzz world did not start: {ready}")
        target, pid = ready[1][1]["tcp"], ready[1][1]["pid"]
        idents = [b"evil", b"r1", b"r0", b"r%d" % (world + 3), b"\x00" * 255, None]
        socks = [_rogue_socket(zctx, target, i, ready[1][1].get("password", "")) for i in idents]
        time.sleep(0.5)
        before = census(pid)
        peak = before["rss_kb"]
        counted = 0  # messages the target should count as rejected (the r0 impostor is dropped by ZeroMQ)
        t0 = time.monotonic()
        last_tick, last_progress = ticks[1], time.monotonic()
        sent = 0
        big_at = set(rng.sample(range(n), min(big_frames, n)))
        raw_at = set(rng.sample(range(n), min(raw_conns, n)))
        raws: list[socket.socket] = []
        checkpoints: list[float] = []  # target RSS (MiB) every tenth of the attack: flat = bounded
        for sent in range(1, n + 1):
            frames = fuzz_message(rng, deep=deep)
            if deep_every and sent % deep_every == 0:
                frames = [deep_header()]
            if sent - 1 in big_at:
                frames = [frames[0], os.urandom(8 << 20)]
            k = rng.randrange(len(socks))
            try:
                socks[k].send_multipart(frames, copy=len(frames[-1]) < 65536)
            except zmq.Again:
                out["hangs"] += 1  # the target stopped reading for 10 s
                break
            counted += idents[k] != b"r0"
            if sent - 1 in raw_at:
                host, port = target.removeprefix("tcp://").rsplit(":", 1)
                try:
                    c = socket.create_connection((host, int(port)), timeout=5)
                    c.sendall(rng.choice([b"GET / HTTP/1.1\r\n\r\n", b"\xff" + os.urandom(9), os.urandom(64)]))
                    raws.append(c)
                except OSError:
                    pass  # the target is gone: counted below
            if sent % 500 == 0:
                rss = census(pid)["rss_kb"]
                peak = max(peak, rss)
                if sent % max(500, (n // 10) // 500 * 500) == 0:
                    checkpoints.append(round(rss / 1024, 1))
                if ticks[1] != last_tick:
                    last_tick, last_progress = ticks[1], time.monotonic()
                if any(p.exitcode is not None for p in w.procs):
                    break
                if time.monotonic() - last_progress > 30 or time.monotonic() - t0 > time_limit:
                    break
        during = census(pid)
        for c in raws:
            c.close()
        out["messages"] = sent
        out["send_s"] = round(time.monotonic() - t0, 1)
        expect.value = counted
        # Progress after the attack: the collectives must go on.
        tick0 = ticks[1]
        deadline = time.monotonic() + 30
        while ticks[1] < tick0 + 20 and time.monotonic() < deadline and w.procs[1].exitcode is None:
            time.sleep(0.1)
        progressed = ticks[1] >= tick0 + 20
        time.sleep(1.0)
        stop.set()
        res = w.wait_for("result", list(range(world)), 90.0)
        after = census(pid) if w.procs[1].is_alive() else {}
        for r in range(world):
            if r not in res:
                out["hangs"] += 1
                out.setdefault("hang_stacks", {})[r] = w.stacks(r)[-3000:]
            elif res[r][0] != "result":
                out["crashes"] += 1
                out.setdefault("crash_errors", {})[r] = res[r][1][-1500:]
            else:
                out["wrong_results"] += len(res[r][1]["wrong"])
        if not progressed and not out["crashes"]:
            out["hangs"] += 1
        v = res.get(1, ("", {}))[1]
        final = v.get("census", after) if isinstance(v, dict) else after
        out.update({
            "rejected": v.get("rejected") if isinstance(v, dict) else None, "expected_rejections": counted,
            "iterations": v.get("iterations") if isinstance(v, dict) else None,
            "rss_before_mb": round(before["rss_kb"] / 1024, 1), "rss_peak_mb": round(max(peak, during["rss_kb"]) / 1024, 1),
            "rss_after_mb": round(final.get("rss_kb", -1) / 1024, 1), "rss_checkpoints_mb": checkpoints,
            "fds_before": before["fds"], "fds_during": during["fds"], "fds_after": final.get("fds", -1),
            "threads_before": before["threads"], "threads_after": final.get("threads", -1),
        })
    finally:
        for s in socks:
            s.close(linger=0)
        zctx.term()
        stop.set()
        leftovers = w.close(grace=15.0)
        if leftovers:
            out["hangs"] += len(leftovers)
            out["killed"] = leftovers
        remove_stale_ipc([p.pid for p in w.procs if p.pid])
    return out
