"""Encrypted by default across hosts: two network namespaces joined by a veth pair, no secret.

Rank 0 and rank 1 listen on non-loopback addresses, so CurveZMQ is on without any setting (keys
derived from the job key in the rendezvous store). tcpdump on the veth records the session: the
gradient bytes never appear in it (with ``COMMLAYER_ENCRYPT=off``, the control, they do). A
stranger in the other namespace squats rank 1's identity, forges PLAIN and CURVE handshakes,
replays the recorded bytes of the real rank 1's connection and declares a 256 MiB frame: the
results stay exact, nothing is delivered, rank 0's RSS stays flat.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

NS_A, NS_B = "secure-a", "secure-b"
VETH_A, VETH_B = "vsecure-a", "vsecure-b"
IP_A, IP_B = "10.231.7.1", "10.231.7.2"
MARKER = b"PLAINTEXT-GRADIENT-MARKER-"
ROUNDS = 5


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=20)


def _unavailable() -> str:
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if shutil.which("ip") is None or shutil.which("tcpdump") is None:
        return "needs ip and tcpdump (apt-get install iproute2 tcpdump)"
    return ""


@pytest.fixture()
def netns():
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    _teardown()
    _sh("ip", "netns", "add", NS_A)
    _sh("ip", "netns", "add", NS_B)
    try:
        _sh("ip", "link", "add", VETH_A, "type", "veth", "peer", "name", VETH_B)
        _sh("ip", "link", "set", VETH_A, "netns", NS_A)
        _sh("ip", "link", "set", VETH_B, "netns", NS_B)
        for ns, dev, ip in ((NS_A, VETH_A, IP_A), (NS_B, VETH_B, IP_B)):
            _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _sh("ip", "-n", ns, "link", "set", dev, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield
    finally:
        _teardown()


def _teardown() -> None:
    for ns in (NS_A, NS_B):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def _in_ns(ns: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, *args], env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _payload_stream(pcap: bytes, src: str, dst: str, dport: int) -> bytes:
    """TCP payload bytes from ``src`` to ``dst:dport`` in capture order (Ethernet/IPv4 pcap)."""
    out = bytearray()
    i = 24
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    while i + 16 <= len(pcap):
        incl = struct.unpack_from("<I", pcap, i + 8)[0]
        pkt = pcap[i + 16:i + 16 + incl]
        i += 16 + incl
        if len(pkt) < 34 or pkt[12:14] != b"\x08\x00" or pkt[23] != 6:
            continue
        ihl = (pkt[14] & 15) * 4
        if pkt[26:30] != s or pkt[30:34] != d:
            continue
        tcp = pkt[14 + ihl:]
        if len(tcp) < 20 or struct.unpack_from(">H", tcp, 2)[0] != dport:
            continue
        out += tcp[(tcp[12] >> 4) * 4:]
    return bytes(out)


def _run_pair(tmp: Path, encrypt: str, attack: bool) -> tuple[list[dict], bytes, dict]:
    port0, master = 29611, 29612
    pcap = tmp / f"wire-{encrypt}.pcap"
    dump = subprocess.Popen(["ip", "netns", "exec", NS_A, "tcpdump", "-i", VETH_A, "-U", "-s", "0", "-w", str(pcap), "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": IP_A, "MASTER_PORT": str(master), "COMMLAYER_ENCRYPT": encrypt,
           "OMP_NUM_THREADS": "1", "COMMLAYER_SECRET": "", "PYTHONPATH": str(Path(__file__).parent)}
    me = str(Path(__file__).resolve())
    r0 = _in_ns(NS_A, [sys.executable, me, "rank", "0", str(port0), "1" if attack else "0"], {**env, "RANK": "0"})
    r1 = _in_ns(NS_B, [sys.executable, me, "rank", "1", "0", "1" if attack else "0"], {**env, "RANK": "1"})
    attack_out: dict = {}
    try:
        if attack:
            deadline = time.monotonic() + 120
            while not _phase2(pcap, port0, deadline):
                time.sleep(0.2)
            replay = _payload_stream(pcap.read_bytes(), IP_B, IP_A, port0)
            (tmp / "replay.bin").write_bytes(replay)
            a = _in_ns(NS_B, [sys.executable, me, "attack", str(port0), str(tmp / "replay.bin")], env)
            attack_out = json.loads(a.communicate(timeout=120)[0].strip().splitlines()[-1])
        outs = []
        for p in (r0, r1):
            text = p.communicate(timeout=180)[0]
            assert p.returncode == 0, text[-3000:]
            outs.append(json.loads(text.strip().splitlines()[-1]))
    finally:
        for p in (r0, r1):
            if p.poll() is None:
                p.kill()
        time.sleep(0.5)
        dump.terminate()
        dump.wait(timeout=10)
    return outs, pcap.read_bytes(), attack_out


def _phase2(pcap: Path, port0: int, deadline: float) -> bool:
    """True once rank 1's real connection to rank 0 has carried data (so there is something to replay)."""
    if time.monotonic() > deadline:
        raise TimeoutError("the ranks never exchanged data")
    return pcap.exists() and len(_payload_stream(pcap.read_bytes(), IP_B, IP_A, port0)) > 4096


@pytest.mark.slow
def test_encrypted_by_default_across_hosts_and_strangers_locked_out(netns: None, tmp_path: Path) -> None:
    outs, wire, attack = _run_pair(tmp_path, "auto", attack=True)
    for o in outs:
        assert o["encrypted"] and o["sums_ok"], o
        assert o["mailbox"] == 0 and o["rejected"] == 0, o
    assert outs[0]["hwm_growth_mib"] < 64, outs[0]
    assert attack["replayed_bytes"] > 4096 and attack["sent"] > 0, attack
    assert len(wire) > 100_000, "the capture saw the session"
    assert MARKER not in wire, "plaintext gradient bytes crossed the wire"
    print(f"capture {len(wire)} bytes, marker absent; attack {attack}; rank 0 RSS growth {outs[0]['hwm_growth_mib']:.1f} MiB")


@pytest.mark.slow
def test_capture_sees_plaintext_when_encryption_is_off(netns: None, tmp_path: Path) -> None:
    outs, wire, _ = _run_pair(tmp_path, "off", attack=False)
    assert not outs[0]["encrypted"] and outs[0]["sums_ok"]
    assert MARKER in wire  # the control: the capture would have shown it


# ------------------------------------------------------------------------------------- subprocesses
def _rank_main(rank: int, port: int, long_run: bool) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from test_rogue import _hwm_mib

    os.environ["COMMLAYER_IPC"] = "0"
    if port:
        os.environ["COMMLAYER_PORT"] = str(port)
    dist.init_process_group("zmq", timeout=timedelta(seconds=90))
    pg = dist.group.WORLD
    hwm0 = _hwm_mib()
    marker = torch.frombuffer(bytearray(MARKER * 4000), dtype=torch.uint8)
    ok = True
    t_end = time.monotonic() + (25.0 if long_run else 0.0)
    i = 0
    while True:
        t = marker.clone() if rank == 0 else torch.zeros_like(marker)
        dist.all_reduce(t)  # rank 1 adds zeros: the marker bytes travel both ways
        ok &= bool(torch.equal(t, marker))
        flag = torch.tensor([int(time.monotonic() >= t_end and i >= ROUNDS)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # both ranks stop together
        i += 1
        if flag.item():
            break
        time.sleep(0.05)
    out = {"sums_ok": ok, "rounds": i, "encrypted": pg.transport.curve is not None, "mailbox": pg.transport.mailbox.stats()["messages"],
           "rejected": pg.transport.rejected, "hwm_growth_mib": _hwm_mib() - hwm0}
    dist.destroy_process_group()
    print(json.dumps(out), flush=True)


def _attack_main(port: int, replay_file: str) -> None:
    import zmq

    ctx = zmq.Context()
    target = f"tcp://{IP_A}:{port}"
    socks = []
    pub, sec = zmq.curve_keypair()
    fake_server, _ = zmq.curve_keypair()
    for mech in ("null", "plain", "curve"):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.ROUTING_ID, b"r1")
        s.setsockopt(zmq.LINGER, 0)
        if mech == "plain":
            s.plain_username, s.plain_password = b"r1", b"guess"
        elif mech == "curve":
            s.curve_publickey, s.curve_secretkey, s.curve_serverkey = pub, sec, fake_server
        s.connect(target)
        socks.append(s)
    sent = 0
    for s in socks:
        for k in range(20):
            try:
                s.send_multipart([b"\x9e" + b"forged header" * 3, MARKER * 10], zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                pass
    replay = Path(replay_file).read_bytes()
    for _ in range(3):  # the real rank 1's recorded bytes, replayed on new connections
        try:
            c = socket.create_connection((IP_A, port), timeout=5)
            c.sendall(replay)
            time.sleep(0.3)
            c.close()
        except OSError:
            pass
    streamed = 0
    try:
        raw = socket.create_connection((IP_A, port), timeout=5)
        raw.sendall(b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"CURVE".ljust(20, b"\0") + b"\0" * 32)
        raw.recv(64)
        raw.sendall(b"\x02" + struct.pack(">Q", 256 << 20))
        for _ in range(256):
            raw.sendall(b"x" * (1 << 20))
            streamed += 1
    except OSError:
        pass
    time.sleep(2.0)
    for s in socks:
        s.close(linger=0)
    ctx.term()
    print(json.dumps({"sent": sent, "replayed_bytes": len(replay), "streamed_mib": streamed}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "rank":
        _rank_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1")
    else:
        _attack_main(int(sys.argv[2]), sys.argv[3])
