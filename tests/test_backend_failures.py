"""Failure behaviour: dead peers, hostile frames, port clashes, timeouts, clean shutdown."""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from datetime import timedelta

import msgpack
import pytest
import torch
import torch.distributed as dist
import zmq

from multiproc import free_port, run_world


def _kill_worker(rank: int, world: int, victim: int) -> dict:
    dist.init_process_group("zmq", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    t = torch.ones(1 << 18)
    start = time.monotonic()
    try:
        for i in range(10_000):
            dist.all_reduce(t)
            if i == 2 and rank == victim:
                os._exit(17)  # die without any goodbye, mid-job (its last frames may never leave)
        return {"error": None}
    except Exception as exc:  # the expected path
        first = (type(exc).__name__, str(exc), time.monotonic() - start)
    try:  # later operations fail at once, naming the same cause
        t0 = time.monotonic()
        dist.broadcast(torch.zeros(4), src=0)
        later = None
    except Exception as exc:
        later = (str(exc), time.monotonic() - t0)
    dist.destroy_process_group()
    return {"error": first, "later": later}


@pytest.mark.parametrize("world,victim", [(3, 2), (4, 1)])
def test_killed_rank_fails_survivors_with_named_error(world: int, victim: int) -> None:
    res = run_world(_kill_worker, world, victim, timeout=120, allow_failures=True)
    for rank, r in enumerate(res):
        if rank == victim:
            continue
        assert isinstance(r, dict), f"rank {rank} did not report: {r}"
        assert r["error"] is not None, f"rank {rank} never noticed the dead peer"
        kind, msg, took = r["error"]
        assert kind == "PeerFailure", msg
        assert f"rank {victim}" in msg and "allreduce" in msg and "group" in msg, msg
        assert took < 10, f"rank {rank} needed {took:.1f} s to notice"
        assert r["later"] is not None and f"rank {victim}" in r["later"][0], r["later"]
        assert r["later"][1] < 1.0


def _garbage_worker(rank: int, world: int) -> dict:
    dist.init_process_group("zmq", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    pg = dist.group.WORLD
    sent = 0
    if rank == 0:
        target = pg.transport.peer_info[1].tcp
        ctx = zmq.Context()
        bad = [
            [b"not msgpack \xff\xfe"],
            [msgpack.packb([99, 0, "allreduce", "pg0", 1, 0, 0, 0, "", [], [], None])],  # wrong version
            [msgpack.packb([1, 0, "allreduce", "pg0", 1, 0, 0, 0, "float32", [4], [16], None])],  # missing frame
            [msgpack.packb([1, 0, "allreduce", "pg0", 1, 0, 0, 0, "pickle", [], [], None]), b"x"],  # bad dtype
            [msgpack.packb([1, 0, "x", "pg0", 1, 0, 0, 0, "", [], [3], None]), b"toolong"],  # size mismatch
            [msgpack.packb([1, 0, "x", "pg0", 1, 0, 0, 0, "", [], [], None])],  # spoofs rank 0 from another identity
            [b"\xdd\xff\xff\xff\xff"],  # msgpack array claiming 4G elements
        ]
        creds = pg.transport.creds  # an insider (it holds rank 0's job credentials): its garbage reaches validation
        for ident in (b"evil", b"r0"):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.ROUTING_ID, ident)
            if creds.passwords is not None:
                s.plain_username, s.plain_password = b"r0", creds.passwords[0].encode()
            s.setsockopt(zmq.LINGER, 5000)  # deliver everything before closing, even on a loaded machine
            s.connect(target)
            for frames in bad:
                s.send_multipart(frames)
                sent += 1
            s.close()
        raw = socket.create_connection(("127.0.0.1", int(target.rsplit(":", 1)[1])), timeout=5)
        raw.sendall(b"GET / HTTP/1.1\r\n\r\n" + os.urandom(4096))  # not even ZMTP
        raw.close()
        ctx.term()
    dist.barrier()
    deadline = time.monotonic() + 10
    while rank == 1 and pg.transport.rejected < 7 and time.monotonic() < deadline:
        time.sleep(0.05)
    t = torch.full((1000,), float(rank + 1))
    dist.all_reduce(t)  # still fully functional
    out = {"rejected": pg.transport.rejected, "sum": t[0].item(), "sent": sent}
    dist.destroy_process_group()
    return out


def test_garbage_frames_are_rejected_and_rank_keeps_working() -> None:
    res = run_world(_garbage_worker, 2, timeout=90)
    assert res[1]["rejected"] >= 7, res
    assert res[0]["sum"] == res[1]["sum"] == 3.0


def _port_clash_worker(rank: int, world: int, port: int) -> str:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    os.environ["COMMLAYER_PORT"] = str(port)
    try:
        dist.init_process_group("zmq", rank=rank, world_size=world, timeout=timedelta(seconds=10))
        return "no error"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        blocker.close()


def test_second_listener_on_same_port_gives_clear_error() -> None:
    (msg,) = run_world(_port_clash_worker, 1, free_port(), timeout=60)
    assert "could not listen" in msg and "COMMLAYER_PORT" in msg, msg


def _timeout_worker(rank: int, world: int) -> tuple[str, float]:
    dist.init_process_group("zmq", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    result = ("", 0.0)
    if rank == 0:
        t0 = time.monotonic()
        try:  # rank 1 never joins this broadcast; the per-call timeout bounds the wait
            dist.barrier(timeout=timedelta(seconds=2))
        except Exception as exc:
            result = (f"{type(exc).__name__}: {exc}", time.monotonic() - t0)
    else:
        time.sleep(4)
    return result


def test_per_call_timeout_names_op_peer_and_group() -> None:
    msg, took = run_world(_timeout_worker, 2, timeout=60)[0]
    assert "CommTimeout" in msg and "barrier" in msg and "rank 1" in msg and "group" in msg, msg
    # gloo's wording, which torch's own suite (" (Timed out|closed|timeout) ") and user code match
    assert re.search(" (Timed out|closed|timeout) ", msg) and "Timed out waiting 2000ms" in msg, msg
    assert 1.5 < took < 8, took


def _shutdown_worker(rank: int, world: int, ports: list[int]) -> dict:
    def census() -> tuple[int, int]:
        return len(os.listdir("/proc/self/fd")), threading.active_count()

    counts = []
    for port in ports:  # init/destroy three times: nothing accumulates
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("zmq", rank=rank, world_size=world, timeout=timedelta(seconds=30))
        t = torch.ones(100_000)
        dist.all_reduce(t)
        w = dist.all_reduce(t, async_op=True)
        w.wait()
        dist.destroy_process_group()
        counts.append(census())
    names = [t.name for t in threading.enumerate() if t.name.startswith("commlayer")]
    return {"counts": counts, "threads": names}


def test_destroy_closes_sockets_and_threads() -> None:
    for r in run_world(_shutdown_worker, 2, [free_port() for _ in range(3)], timeout=90):
        assert r["threads"] == [], r
        # The first cycle may leave one-time state (torch's and pyzmq's helpers); later cycles must not add any.
        assert r["counts"][2] == r["counts"][0], f"file descriptors or threads grow per init/destroy: {r}"
