"""Link probes (TCP bulk throughput, TCP ping-pong RTT, UDP echo) for tests and benchmarks.

Run ``python -m commlayer.wan.probe serve HOST PORT`` in one place (a namespace, or a thread
via :func:`serve_in_thread`) and the client functions (or ``python -m commlayer.wan.probe
bulk|ping|udp HOST PORT``, which print JSON) elsewhere.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import statistics
import struct
import threading
import time
from typing import Any

_BULK, _PING = b"B", b"P"
_CHUNK = 64 * 1024


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = s.recv(n - len(buf))
        if not part:
            raise ConnectionError("peer closed")
        buf += part
    return bytes(buf)


def _handle(c: socket.socket, warmup_s: float) -> None:
    with c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        mode = _recv_exact(c, 1)
        if mode == _PING:
            size = struct.unpack("!I", _recv_exact(c, 4))[0]
            while True:
                try:
                    c.sendall(_recv_exact(c, size))
                except ConnectionError:
                    return
        total, t_first, t_last, mark_t, mark_b = 0, 0.0, 0.0, 0.0, 0
        timeline: list[tuple[float, int]] = []
        buf = bytearray(_CHUNK)
        while True:
            n = c.recv_into(buf)
            now = time.monotonic()
            if n == 0:
                break
            if total == 0:
                t_first = now
            total += n
            t_last = now
            if not timeline or now - timeline[-1][0] >= 0.02:
                timeline.append((now, total))
            # Mark only after a read that drained the socket, so no earlier byte counts as later.
            if not mark_t and now - t_first >= warmup_s and n < len(buf):
                mark_t, mark_b = now, total
        rate = (total - mark_b) * 8 / (t_last - mark_t) / 1e6 if mark_t and t_last > mark_t else 0.0
        timeline.append((t_last, total))
        res = {"bytes": total, "seconds": t_last - t_first, "rate_mbit": rate, "first_byte_t": t_first,
               "timeline": timeline}
        c.sendall(json.dumps(res).encode())


def serve(host: str, port: int, timeout_s: float, warmup_s: float = 0.5, ready: threading.Event | None = None,
          stop: threading.Event | None = None) -> None:
    """Serves TCP probes (and UDP echo on the same port) until ``timeout_s`` or ``stop``."""
    deadline = time.monotonic() + timeout_s
    with socket.socket() as ls, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as us:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((host, port))
        ls.listen(16)
        ls.setblocking(False)
        us.bind((host, port))
        us.setblocking(False)
        if ready is not None:
            ready.set()
        print("ready", flush=True)
        threads = []
        while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            readable, _, _ = select.select([ls, us], [], [], 0.05)
            if ls in readable:
                try:
                    c, _ = ls.accept()
                except BlockingIOError:
                    continue
                c.setblocking(True)
                c.settimeout(max(1.0, deadline - time.monotonic()))
                t = threading.Thread(target=_handle, args=(c, warmup_s), daemon=True)
                t.start()
                threads.append(t)
            if us in readable:
                try:
                    for _ in range(256):
                        data, addr = us.recvfrom(2048)
                        us.sendto(data, addr)
                except BlockingIOError:
                    pass
        for t in threads:
            t.join(timeout=max(0.1, deadline - time.monotonic()))


def serve_in_thread(host: str, port: int, timeout_s: float, warmup_s: float = 0.5) -> tuple[threading.Thread, threading.Event]:
    """Starts :func:`serve` in a daemon thread; returns (thread, stop event). Waits until listening."""
    ready, stop = threading.Event(), threading.Event()
    t = threading.Thread(target=serve, args=(host, port, timeout_s, warmup_s, ready, stop), daemon=True)
    t.start()
    if not ready.wait(10.0):
        raise RuntimeError("probe server did not start")
    return t, stop


def bulk(host: str, port: int, seconds: float, max_bytes: int = 1 << 30, timeout_s: float = 60.0) -> dict[str, Any]:
    """Sends for ``seconds`` (or ``max_bytes``); returns the receiver's measured rate (Mbit/s)."""
    with socket.create_connection((host, port), timeout=timeout_s) as s:
        s.sendall(_BULK)
        payload = b"\0" * _CHUNK
        end, sent = time.monotonic() + seconds, 0
        while time.monotonic() < end and sent < max_bytes:
            s.sendall(payload)
            sent += len(payload)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            part = s.recv(4096)
            if not part:
                break
            data += part
    res = json.loads(data)
    res["sent"] = sent
    return res


def ping(host: str, port: int, count: int = 20, size: int = 64, interval_s: float = 0.02,
         timeout_s: float = 30.0) -> list[float]:
    """TCP ping-pong of ``size``-byte messages; returns each round trip in milliseconds."""
    out = []
    with socket.create_connection((host, port), timeout=timeout_s) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(_PING + struct.pack("!I", size))
        msg = b"x" * size
        for _ in range(count + 1):
            t = time.monotonic()
            s.sendall(msg)
            _recv_exact(s, size)
            out.append((time.monotonic() - t) * 1000.0)
            time.sleep(interval_s)
    return out[1:]  # the first includes connection set-up through the relay


def udp(host: str, port: int, count: int = 500, interval_s: float = 0.004, wait_s: float = 1.0) -> dict[str, Any]:
    """UDP echo: returns ``{"sent", "received", "rtts_ms"}`` (lost = sent - received)."""
    rtts: dict[int, float] = {}
    sent_at: dict[int, float] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        s.setblocking(False)

        def drain() -> None:
            while True:
                try:
                    data = s.recv(2048)
                except (BlockingIOError, ConnectionRefusedError):
                    return
                seq = struct.unpack("!I", data[:4])[0]
                if seq in sent_at and seq not in rtts:
                    rtts[seq] = (time.monotonic() - sent_at[seq]) * 1000.0

        start = time.monotonic()
        for seq in range(count):
            sent_at[seq] = time.monotonic()
            s.send(struct.pack("!I", seq) + b"\0" * 60)
            # Wait for replies until the next send is due, timestamping each as it arrives.
            next_t = start + (seq + 1) * interval_s
            while (left := next_t - time.monotonic()) > 0:
                if select.select([s], [], [], left)[0]:
                    drain()
        end = time.monotonic() + wait_s
        while len(rtts) < count and (left := end - time.monotonic()) > 0:
            if select.select([s], [], [], left)[0]:
                drain()
    return {"sent": count, "received": len(rtts), "rtts_ms": [rtts[k] for k in sorted(rtts)]}


def main(argv: list[str] | None = None) -> None:
    """CLI: ``serve|bulk|ping|udp HOST PORT [--seconds S] [--timeout T]``; clients print JSON."""
    ap = argparse.ArgumentParser(prog="python -m commlayer.wan.probe")
    ap.add_argument("cmd", choices=["serve", "bulk", "ping", "udp"])
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--warmup", type=float, default=0.5)
    a = ap.parse_args(argv)
    if a.cmd == "serve":
        serve(a.host, a.port, a.timeout, a.warmup)
    elif a.cmd == "bulk":
        print(json.dumps(bulk(a.host, a.port, a.seconds, timeout_s=a.timeout)))
    elif a.cmd == "ping":
        r = ping(a.host, a.port, a.count, timeout_s=a.timeout)
        print(json.dumps({"rtts_ms": r, "median_ms": statistics.median(r)}))
    else:
        print(json.dumps(udp(a.host, a.port, a.count)))


if __name__ == "__main__":
    main()
