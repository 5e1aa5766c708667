"""``launch`` in relay mode: a plain-TCP echo through the relays, failure propagation, timeout."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from commlayer.wan import launch

ECHO = r'''
import json, os, socket, statistics, sys, time
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
print(f"env rank={rank} world={world} local={os.environ['LOCAL_RANK']}/{os.environ['LOCAL_WORLD_SIZE']}")
if rank == 1:
    ls = socket.create_server(("127.0.0.1", int(os.environ["COMMLAYER_PORT"])))
    ls.settimeout(30)
    c, _ = ls.accept()
    c.settimeout(30)
    while data := c.recv(4096):
        c.sendall(data)
    sys.exit(0)
endpoint = json.loads(os.environ["COMMLAYER_CONNECT_OVERRIDES"])["1"]
host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
deadline = time.monotonic() + 30
while True:  # rank 1 may not listen yet; the relay then closes (or resets) our connection
    s = socket.create_connection((host, int(port)), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        s.sendall(b"hello")
        if s.recv(5) == b"hello":
            break
    except OSError:
        pass
    s.close()
    assert time.monotonic() < deadline
    time.sleep(0.1)
rtts = []
for _ in range(5):
    t = time.monotonic(); s.sendall(b"x" * 100); got = 0
    while got < 100:
        got += len(s.recv(100 - got))
    rtts.append((time.monotonic() - t) * 1000)
s.close()
print(f"rtt_ms={statistics.median(rtts):.2f}")
'''

FAIL = "import os, sys, time\nif os.environ['RANK'] == '1':\n    sys.exit(3)\ntime.sleep(60)\n"
HANG = "import time\nprint('started', flush=True)\ntime.sleep(60)\n"


def _script(tmp_path: Path, text: str) -> str:
    p = tmp_path / "job.py"
    p.write_text(text)
    return str(p)


def test_launch_echo_through_relays(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = launch(2, "wan-20mbit-50ms", _script(tmp_path, ECHO), mode="relay", timeout_s=60)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "[rank 0] env rank=0 world=2 local=0/2" in out and "[rank 1] env rank=1 world=2 local=1/2" in out
    rtt = float(out.split("[rank 0] rtt_ms=")[1].split()[0])
    assert rtt == pytest.approx(50.0, abs=2.5)


def test_launch_propagates_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    start = time.monotonic()
    rc = launch(2, "datacenter", _script(tmp_path, FAIL), mode="relay", timeout_s=60, grace_s=0.5)
    assert rc == 3
    assert time.monotonic() - start < 20  # rank 0 (sleeping 60 s) was terminated


def test_launch_timeout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    start = time.monotonic()
    rc = launch(2, "datacenter", _script(tmp_path, HANG), mode="relay", timeout_s=3)
    assert rc == 124
    assert time.monotonic() - start < 20
    assert capsys.readouterr().out.count("started") == 2
