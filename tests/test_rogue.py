"""Rogue peers with NO secret configured: strangers never get past the handshake.

The ranks share a job key through the rendezvous store, so on loopback every connection must
authenticate (ZMTP PLAIN with a per-rank password) before ZeroMQ gives it a routing identity or
hands any of its frames to commlayer. A stranger squats rank 1's identity before the real rank 1
starts, forges the handshake (no credentials, then wrong ones), sends forged and replayed data
frames, and declares 256 MiB frames: 0 messages delivered, results exact, rank 0's RSS bounded.
The encrypted variant across two network namespaces is in ``test_rogue_netns.py``.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import zmq

from commlayer.transport import envelope
from commlayer.transport.wire import Call, Kind
from multiproc import free_port, run_world

ROUNDS = 5
BIG = 256 << 20


def _hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"rank 0 never listened on port {port}")


def _forged_frames() -> list[list[bytes]]:
    """What a rank 1 would send: its HELLO, then the data of every all-reduce (value 100), then a
    second copy of each (a replay)."""
    hello = envelope.control(Kind.HELLO, "__hello__", 1, meta={"world_size": 2, "nonce": "squatter"})
    out = [[hello.pack()]]
    for seq in range(1, ROUNDS + 1):
        call = Call(count=1, dtype="float32", redop="sum")
        for step in range(2):
            h = envelope.collective("allreduce", "pg0", seq, 1, call, step=step, dtype="float32", shape=(1,), nbytes=(4,))
            out.append([h.pack(), struct.pack("<f", 100.0)])
    big = envelope.collective("allreduce", "pg0", ROUNDS + 1, 1, None, dtype="uint8", shape=(BIG,), nbytes=(BIG,))
    out.append([big.pack(), b"\0" * BIG])  # a 256 MiB message, declared and real
    return out + out[1:-1]  # replayed


def _attack(port: int) -> dict:
    """Runs in rank 1's process before the real rank 1 starts."""
    _wait_port(port, 60)
    ctx = zmq.Context()
    socks = []
    for creds in (None, (b"r1", b"wrong-password")):  # squatting without credentials, forged handshake
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.ROUTING_ID, b"r1")
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 0)
        if creds is not None:
            s.plain_username, s.plain_password = creds
        s.connect(f"tcp://127.0.0.1:{port}")
        socks.append(s)
    sent = 0
    for frames in _forged_frames():
        for s in socks:
            try:
                s.send_multipart(frames, zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                pass
    # A raw ZMTP client that skips straight to a 256 MiB frame after the greeting.
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    raw.sendall(b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"PLAIN".ljust(20, b"\0") + b"\0" * 32)
    streamed = 0
    try:
        raw.recv(64)
        raw.sendall(b"\x02" + struct.pack(">Q", BIG))
        chunk = b"x" * (1 << 20)
        for _ in range(BIG >> 20):
            raw.sendall(chunk)
            streamed += len(chunk)
    except OSError:
        pass  # the rank hung up on the declared size: nothing was buffered
    raw.close()
    time.sleep(2.0)  # give rank 0 every chance to (wrongly) read what was sent
    for s in socks:
        s.close(linger=0)
    ctx.term()
    return {"queued": sent, "streamed_mib": streamed >> 20}


def _worker(rank: int, world: int, port: int) -> dict:
    out: dict = {}
    os.environ["COMMLAYER_IPC"] = "0"  # the stranger can only come over TCP; make rank 1 do so too
    # A store that does not wait for every worker (as torchrun's agent store), so rank 0 listens
    # while rank 1 is still "late".
    store = dist.TCPStore("127.0.0.1", int(os.environ["MASTER_PORT"]), world, rank == 0, timedelta(seconds=60),
                          wait_for_workers=False)
    if rank == 0:
        os.environ["COMMLAYER_PORT"] = str(port)
    else:
        out["attack"] = _attack(port)
    hwm0 = _hwm_mib()
    dist.init_process_group("zmq", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    pg = dist.group.WORLD
    sums = []
    for _ in range(ROUNDS):
        t = torch.full((1,), float(rank + 1))
        dist.all_reduce(t)
        sums.append(t.item())
    out.update(sums=sums, rejected=pg.transport.rejected, mailbox=pg.transport.mailbox.stats()["messages"],
               hwm_growth_mib=_hwm_mib() - hwm0, authenticated=pg.transport.creds.authenticated)
    dist.destroy_process_group()
    return out


def test_stranger_without_secret_is_locked_out() -> None:
    res = run_world(_worker, 2, free_port(), timeout=180)
    r0, r1 = res
    assert r1["attack"]["queued"] > 0
    for r in res:
        assert r["authenticated"]
        assert r["sums"] == [3.0] * ROUNDS, r  # exact: none of the forged 100.0 was summed
        assert r["mailbox"] == 0  # 0 messages delivered and left over
        assert r["rejected"] == 0  # nothing even reached commlayer's validation
    # The stranger's 256 MiB (declared and really sent) never became rank 0's memory.
    assert r0["hwm_growth_mib"] < 64, r0
    print(f"rank 0 peak RSS growth {r0['hwm_growth_mib']:.1f} MiB while a stranger streamed "
          f"{r1['attack']['streamed_mib']} MiB and queued {r1['attack']['queued']} forged messages")


def _big_worker(rank: int, world: int, encrypt: str) -> bool:
    os.environ["COMMLAYER_IPC"] = "0"
    os.environ["COMMLAYER_ENCRYPT"] = encrypt
    dist.init_process_group("zmq", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        t = torch.arange(5 << 20, dtype=torch.float32) * (rank + 1)  # 20 MiB frames: 3 wire parts each
        dist.all_reduce(t)
        dist.broadcast(t, src=1)
        return bool(torch.equal(t, torch.arange(5 << 20, dtype=torch.float32) * 3))
    finally:
        dist.destroy_process_group()


def test_frames_above_the_part_cap_arrive_exact_encrypted_or_not() -> None:
    for encrypt in ("on", "off"):
        assert run_world(_big_worker, 2, encrypt, timeout=200) == [True, True], encrypt
