"""Namespace mode (root): rate, RTT, real loss and jitter over TUN links; gloo through launch.

Skipped with the reason when not root. Probes run as plain scripts inside the namespaces.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from commlayer.wan import LinkSpec, NetnsWorld, launch, netns_unavailable_reason, profile_matrix
from commlayer.wan import probe as probe_mod
from commlayer.wan.matrix import LinkMatrix, replace_links, uniform_matrix

REASON = netns_unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=str(REASON))
PROBE = [sys.executable, probe_mod.__file__]
PORT = "5000"
TCP_IP_HEADERS = 52  # IPv4 + TCP with timestamps


def _clean(m: LinkMatrix) -> LinkMatrix:
    """No jitter or loss, and a 1 s buffer: TCP then never overflows it within a 3 s transfer,
    so the app-level rate is not blurred by loss recovery (drop-tail is unit-tested)."""
    return replace_links(m, {(i, j): s.with_(jitter_ms=0.0, loss=0.0, queue_ms=1000.0) for i, j, s in m.pairs()})


def _client(w: NetnsWorld, rank: int, args: list[str], timeout_s: float) -> dict:
    r = w.run(rank, [*PROBE, *args], timeout_s=timeout_s, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _server(w: NetnsWorld, rank: int, warmup: str = "1.0") -> subprocess.Popen[str]:
    srv = w.popen(rank, [*PROBE, "serve", w.addresses[rank], PORT, "--timeout", "40", "--warmup", warmup],
                  stdout=subprocess.PIPE, text=True)
    assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
    return srv


@pytest.mark.parametrize("name", ["wan-20mbit-50ms", "home-broadband", "lte"])
def test_netns_profile_rate_and_rtt(name: str) -> None:
    m = _clean(profile_matrix(name, 2))
    spec, rtt = m.link(0, 1), m.rtt_ms(0, 1)
    with NetnsWorld(m, mtu=1500) as w:
        srv = _server(w, 1)
        try:
            rtts = _client(w, 0, ["ping", w.addresses[1], PORT, "--count", "10"], 30)["rtts_ms"]
            res = _client(w, 0, ["bulk", w.addresses[1], PORT, "--seconds", "3"], 40)
        finally:
            srv.kill()
            srv.wait(timeout=5)
    goodput = spec.rate_mbit * (1500 - TCP_IP_HEADERS) / 1500  # the rate counts IP bytes
    print(f"{name}: rate {spec.rate_mbit} (goodput {goodput:.2f}) -> {res['rate_mbit']:.2f} Mbit/s, "
          f"rtt {rtt} -> {statistics.median(rtts):.2f} ms")
    assert abs(statistics.median(rtts) - rtt) <= max(0.05 * rtt, 1.0)
    assert res["rate_mbit"] == pytest.approx(goodput, rel=0.05)


def test_netns_loss_and_jitter_statistics() -> None:
    base = LinkSpec(10.0, 50.0)
    m = replace_links(uniform_matrix("stats", 3, base), {(0, 1): base.with_(loss=0.1),
                                                         (2, 0): base.with_(jitter_ms=5.0)})
    with NetnsWorld(m, seed=5) as w:
        s1, s2 = _server(w, 1), _server(w, 2)
        try:
            lossy = _client(w, 0, ["udp", w.addresses[1], PORT, "--count", "600"], 30)
            jit = subprocess.run([*w.prefix(0), sys.executable, "-c", textwrap.dedent(f"""
                import json
                from commlayer.wan import probe
                print(json.dumps(probe.udp({w.addresses[2]!r}, {PORT}, 100, 0.02, 0.5)))""")],
                capture_output=True, text=True, timeout=30)
            jitter = json.loads(jit.stdout)
            stats = w.stats()
        finally:
            for s in (s1, s2):
                s.kill()
                s.wait(timeout=5)
    lost = lossy["sent"] - lossy["received"]
    assert abs(lost - 60) < 4 * math.sqrt(600 * 0.1 * 0.9)
    assert stats[(0, 1)]["dropped_units"] >= lost  # every lost probe was dropped by the forwarder
    r = jitter["rtts_ms"]
    assert jitter["received"] == 100
    assert statistics.mean(r) == pytest.approx(20.0, abs=1.5)
    assert statistics.stdev(r) == pytest.approx(5.0, rel=0.3)


def test_netns_teardown_leaves_nothing() -> None:
    with NetnsWorld(profile_matrix("lte", 2)) as w:
        names = list(w.names)
        assert subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.count(w.tag) == 2
        w.popen(0, ["sleep", "30"])  # left running on purpose: close() must kill it
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    assert not any(n in listing for n in names) and w.tag not in links


GLOO_SCRIPT = """
import os, time, torch, torch.distributed as dist
dist.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=60))
t = torch.ones(4) * (dist.get_rank() + 1)
dist.all_reduce(t)
times = []
for _ in range(5):
    s = time.monotonic(); dist.all_reduce(torch.ones(1)); times.append(time.monotonic() - s)
print(f"sum={t[0].item():.0f} addr={os.environ['COMMLAYER_HOST']} allreduce_ms={1000 * sorted(times)[2]:.1f}")
dist.destroy_process_group()
"""


def test_launch_gloo_over_netns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "gloo_job.py"
    script.write_text(GLOO_SCRIPT)
    rc = launch(2, "wan-20mbit-50ms", str(script), mode="netns", timeout_s=120)
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = [line for line in out.splitlines() if "sum=" in line]
    assert len(lines) == 2 and all("sum=3" in line for line in lines)
    assert "[rank 1] sum=3 addr=10.77.0.2" in out
    ms = [float(line.rsplit("allreduce_ms=", 1)[1]) for line in lines]
    assert min(ms) >= 0.9 * 25.0  # every all-reduce crosses the 25 ms one-way link at least once


_SINK = textwrap.dedent('''
    import socket, sys, threading
    s = socket.create_server((sys.argv[1], 5000)); print("ready", flush=True)
    def serve(c):
        if c.recv(1) == b"P":
            while (d := c.recv(64)):
                c.sendall(d)
            return
        n = 0
        while (d := c.recv(65536)):
            n += len(d)
        c.sendall(str(n).encode())
    while True:
        threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
''')
_SOURCE = textwrap.dedent('''
    import json, socket, sys, time
    host, mode, arg = sys.argv[1], sys.argv[2], float(sys.argv[3])
    c = socket.create_connection((host, 5000)); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if mode == "ping":
        c.sendall(b"P"); out = []
        for _ in range(int(arg)):
            t = time.monotonic(); c.sendall(b"x" * 64); got = 0
            while got < 64:
                got += len(c.recv(64))
            out.append(time.monotonic() - t); time.sleep(0.2)
        print(json.dumps(out))
    else:
        c.sendall(b"B"); t = time.monotonic(); buf = b"x" * 65536
        while time.monotonic() - t < arg:
            c.sendall(buf)
        c.shutdown(socket.SHUT_WR); n = int(c.recv(100))
        print(json.dumps({"mbit": n * 8 / (time.monotonic() - t) / 1e6}))
''')


def test_kernel_shaped_links_are_asymmetric_and_bufferbloated() -> None:
    """veth + tbf in a modem namespace: a 1 Mbit/s uplink with 3 s of queue (loss-based TCP fills it,
    so a ping behind a bulk flow waits more than a second) and a 10 Mbit/s downlink."""
    from commlayer.wan import AccessLink, KernelWorld, tc_unavailable_reason

    if tc_unavailable_reason() is not None:
        pytest.skip(str(tc_unavailable_reason()))
    py = sys.executable
    with KernelWorld([AccessLink(1, 10, 3000, 100), AccessLink(10, 10, 100, 100)], prefix="livew") as w:
        srv = [w.popen(r, [py, "-c", _SINK, w.addresses[r]], stdout=subprocess.PIPE, text=True) for r in (0, 1)]
        try:
            assert all(s.stdout is not None and s.stdout.readline().strip() == "ready" for s in srv)
            up = w.popen(0, [py, "-c", _SOURCE, w.addresses[1], "bulk", "9"], stdout=subprocess.PIPE, text=True)
            import time as _t
            _t.sleep(5.0)
            loaded = json.loads(subprocess.run([*w.prefix(0), py, "-c", _SOURCE, w.addresses[1], "ping", "2"],
                                               capture_output=True, text=True, timeout=60).stdout)
            up_rate = json.loads(up.communicate(timeout=90)[0])["mbit"]
            down_rate = json.loads(subprocess.run([*w.prefix(1), py, "-c", _SOURCE, w.addresses[0], "bulk", "4"],
                                                  capture_output=True, text=True, timeout=60).stdout)["mbit"]
        finally:
            for s in srv:
                s.kill()
                s.wait(timeout=5)
    assert 0.85 <= up_rate <= 1.0, up_rate  # TCP goodput of the 1 Mbit/s uplink
    assert 8.0 <= down_rate <= 10.0, down_rate  # the 10 Mbit/s direction
    assert max(loaded) > 1.0, loaded  # seconds of queue ahead of the ping: bufferbloat
