"""CurveZMQ: encrypted, authenticated peers; rogue clients can neither read nor inject."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from datetime import timedelta

import msgpack
import torch
import torch.distributed as dist
import zmq

from multiproc import free_port, run_world

SECRET = "test-job-secret-0123456789"
MARKER = b"PLAINTEXT-GRADIENT-MARKER-"


class _Capture:
    """A TCP proxy that records every byte it forwards (to look at what crosses the wire)."""

    def __init__(self, target_port: int) -> None:
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.target = target_port
        self.data = bytearray()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.srv.settimeout(0.2)
        while not self.stop.is_set():
            try:
                c, _ = self.srv.accept()
            except OSError:
                continue
            try:
                u = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                c.close()
                continue
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        a.settimeout(0.5)
        while not self.stop.is_set():
            try:
                d = a.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if not d:
                break
            with self.lock:
                self.data += d
            try:
                b.sendall(d)
            except OSError:
                break
        for s in (a, b):
            try:
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()
        self.srv.close()


def _wire_worker(rank: int, world: int, ports: list[int], proxy_port: int, secret: str) -> float:
    os.environ["COMMLAYER_PORT"] = str(ports[rank])
    os.environ["COMMLAYER_IPC"] = "0"
    if secret:
        os.environ["COMMLAYER_SECRET"] = secret
    if rank == 0:
        os.environ["COMMLAYER_CONNECT_OVERRIDES"] = json.dumps({"1": f"tcp://127.0.0.1:{proxy_port}"})
    dist.init_process_group("zmq", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    payload = torch.frombuffer(bytearray(MARKER * 64), dtype=torch.uint8).clone()
    if rank == 0:
        dist.send(payload, dst=1)
    else:
        got = torch.zeros_like(payload)
        dist.recv(got, src=0)
        assert torch.equal(got, payload)
    t = torch.ones(10) * (rank + 1)
    dist.all_reduce(t)
    dist.destroy_process_group()
    return t[0].item()


def _run_capture(secret: str) -> bytes:
    ports = [free_port(), free_port()]
    cap = _Capture(ports[1])
    try:
        assert run_world(_wire_worker, 2, ports, cap.port, secret, timeout=60) == [3.0, 3.0]
        time.sleep(0.2)
        with cap.lock:
            return bytes(cap.data)
    finally:
        cap.close()


def test_encryption_hides_payloads_on_the_wire() -> None:
    plain = _run_capture("")
    assert MARKER in plain  # the capture works: without a secret the payload is visible
    enc = _run_capture(SECRET)
    assert len(enc) > len(MARKER) * 64 and MARKER not in enc


def _rogue_worker(rank: int, world: int) -> dict:
    os.environ["COMMLAYER_SECRET"] = SECRET
    dist.init_process_group("zmq", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    pg = dist.group.WORLD
    if rank == 0:
        target = pg.transport.peer_info[1].tcp
        ctx = zmq.Context()
        future = msgpack.packb([1, 0, "allreduce", "pg0", 10**6, 0, 0, 0, "", [], [], None])
        # 1. no encryption at all; 2. a CURVE client with a key the job does not know.
        plain = ctx.socket(zmq.DEALER)
        plain.setsockopt(zmq.ROUTING_ID, b"r0")
        unknown = ctx.socket(zmq.DEALER)
        unknown.setsockopt(zmq.ROUTING_ID, b"r0")
        pub, sec = zmq.curve_keypair()
        unknown.curve_publickey, unknown.curve_secretkey = pub, sec
        server_key = pg.transport.peer_info[1].curve_public.encode()
        unknown.curve_serverkey = server_key
        # 3. an authenticated job member (rank 0's own key) pretending to be rank 2.
        spoof = ctx.socket(zmq.DEALER)
        spoof.setsockopt(zmq.ROUTING_ID, b"r2")
        spoof.curve_publickey, spoof.curve_secretkey = pg.transport.curve.public, pg.transport.curve.secret
        spoof.curve_serverkey = server_key
        for s in (plain, unknown, spoof):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RCVTIMEO, 500)
            s.connect(target)
            s.send_multipart([future])
        spoof.send_multipart([msgpack.packb([1, 0, "allreduce", "pg0", 10**6, 0, 0, 2, "", [], [], None])])
        reads = []
        for s in (plain, unknown):
            try:
                reads.append(s.recv())
            except zmq.Again:
                pass
        time.sleep(1.0)
        for s in (plain, unknown, spoof):
            s.close()
        ctx.term()
        assert not reads
    dist.barrier()
    t = torch.ones(1000) * (rank + 1)
    dist.all_reduce(t)
    out = {"sum": t[0].item(), "rejected": pg.transport.rejected, "mailbox": pg.transport.mailbox.stats()["messages"]}
    dist.destroy_process_group()
    return out


def test_rogue_clients_cannot_inject() -> None:
    res = run_world(_rogue_worker, 3, timeout=90)
    assert all(r["sum"] == 6.0 for r in res), res
    assert res[1]["mailbox"] == 0, "a rogue message reached the mailbox"


def test_authenticated_member_cannot_speak_for_another_rank() -> None:
    """Rank 0's key on a connection that claims to be rank 2 (not connected yet): rejected."""
    from commlayer.transport.config import TransportConfig
    from commlayer.transport.engine import Transport
    from commlayer.transport.security import keys_from_env

    os.environ["COMMLAYER_SECRET"] = SECRET
    try:
        ts = [Transport(r, 3, TransportConfig(timeout=10, linger=0)) for r in (0, 1)]
    finally:
        del os.environ["COMMLAYER_SECRET"]
    try:
        infos = {t.rank: t.listen() for t in ts}
        for t in ts:
            t.connect(infos)
        ctx = zmq.Context()
        spoof = ctx.socket(zmq.DEALER)
        spoof.setsockopt(zmq.ROUTING_ID, b"r2")
        spoof.setsockopt(zmq.LINGER, 0)
        k0 = ts[0].curve
        spoof.curve_publickey, spoof.curve_secretkey = k0.public, k0.secret
        spoof.curve_serverkey = infos[1].curve_public.encode()
        spoof.connect(infos[1].tcp)
        spoof.send_multipart([msgpack.packb([1, 0, "allreduce", "pg0", 5, 0, 0, 2, "", [], [], None])])
        deadline = time.monotonic() + 10
        while ts[1].rejected == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        spoof.close()
        ctx.term()
        assert ts[1].rejected == 1
        assert ts[1].mailbox.stats()["messages"] == 0
        assert keys_from_env(0, 3) is None  # the secret was only in this test's scope
    finally:
        for t in ts:
            t.close()


def _mismatch_worker(rank: int, world: int, done_flag: str) -> str:
    from pathlib import Path

    os.environ["COMMLAYER_SECRET"] = SECRET if rank != 1 else SECRET + "-other"
    t0 = time.monotonic()
    try:
        dist.init_process_group("zmq", rank=rank, world_size=world, timeout=timedelta(seconds=20))
        return "no error"
    except Exception as exc:
        return f"{time.monotonic() - t0:.1f}s {type(exc).__name__}: {exc}"
    finally:
        if rank == 1:
            Path(done_flag).touch()
        deadline = time.monotonic() + 30
        while rank == 0 and not Path(done_flag).exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # rank 0 hosts torch's TCPStore: the other rank must reach its own error first


def test_mismatched_secrets_fail_fast_with_clear_error(tmp_path: Path) -> None:
    res = run_world(_mismatch_worker, 2, str(tmp_path / "rank1-done"), timeout=60)
    for msg in res:
        assert "no error" not in msg and ("key" in msg or "secret" in msg.lower()), msg
        assert float(msg.split("s ", 1)[0]) < 15, msg


def _half_worker(rank: int, world: int) -> str:
    if rank == 0:
        os.environ["COMMLAYER_SECRET"] = SECRET
    try:
        dist.init_process_group("zmq", rank=rank, world_size=world, timeout=timedelta(seconds=10))
        return "no error"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def test_encryption_on_one_side_only_is_refused() -> None:
    res = run_world(_half_worker, 2, timeout=60)
    assert all("encryption" in m or "COMMLAYER_SECRET" in m for m in res), res
