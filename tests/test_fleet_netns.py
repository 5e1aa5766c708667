"""A peer behind NAT takes part, and serves a joiner through the relay; the relay's wire shows no plaintext.

Three network namespaces' worth of routing without iptables (the kernel here has none): the
harness (root namespace) reaches ``fleetpub`` over one veth pair; ``fleetpub`` (hub: store +
relay, public devices) reaches ``fleetnat`` over another. The NAT device listens on an address
that exists only inside ``fleetnat`` (on its loopback, no route to it from anywhere: its
listening port is unreachable) and dials out to the store and the relay. A joiner in
``fleetpub`` picks the NAT device first (newest member), its direct dial fails, and it fetches the
state through the relay. tcpdump on the veth between the namespaces records everything the NAT
device sent or received: the relayed streams hold no plaintext of the state (its magic and
header), and the store's traffic (plaintext TCPStore protocol) shows its key names (the capture
works) but none of the round records' plaintext: the store is off loopback, so the fleet needs
``COMMLAYER_SECRET`` and seals its records encrypted (:mod:`commlayer.fleet.seal`).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from commlayer.fleet.audit import audit
from commlayer.fleet.emulate import LocalFleet
from commlayer.testing.ports import free_port

pytestmark = pytest.mark.integration

PUB, NAT = "fleetpub", "fleetnat"
V_ROOT, V_PUB_R, V_PUB_N, V_NAT = "vfleetroot", "vfleetpubr", "vfleetpubn", "vfleetnat"
IP_ROOT, IP_PUB_R, IP_PUB_N, IP_NAT, IP_HIDDEN = "10.77.1.1", "10.77.1.2", "10.77.0.1", "10.77.0.2", "10.78.0.2"


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=20)


def _unavailable() -> str:
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if shutil.which("ip") is None or shutil.which("tcpdump") is None:
        return "needs ip and tcpdump (apt-get install iproute2 tcpdump)"
    return ""


@pytest.fixture
def namespaces():
    why = _unavailable()
    if why:
        pytest.skip(why)
    for ns in (PUB, NAT):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
    subprocess.run(["ip", "link", "del", V_ROOT], capture_output=True, timeout=20)
    try:
        _sh("ip", "netns", "add", PUB)
        _sh("ip", "netns", "add", NAT)
        _sh("ip", "link", "add", V_ROOT, "type", "veth", "peer", "name", V_PUB_R)
        _sh("ip", "link", "set", V_PUB_R, "netns", PUB)
        _sh("ip", "addr", "add", f"{IP_ROOT}/24", "dev", V_ROOT)
        _sh("ip", "link", "set", V_ROOT, "up")
        _sh("ip", "netns", "exec", PUB, "ip", "link", "add", V_PUB_N, "type", "veth", "peer", "name", V_NAT)
        _sh("ip", "netns", "exec", PUB, "ip", "link", "set", V_NAT, "netns", NAT)
        for ns, dev, ip in ((PUB, V_PUB_R, IP_PUB_R), (PUB, V_PUB_N, IP_PUB_N), (NAT, V_NAT, IP_NAT)):
            _sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ip}/24", "dev", dev)
            _sh("ip", "netns", "exec", ns, "ip", "link", "set", dev, "up")
        for ns in (PUB, NAT):
            _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        _sh("ip", "netns", "exec", NAT, "ip", "addr", "add", f"{IP_HIDDEN}/32", "dev", "lo")  # no route to it from outside
        yield
    finally:
        subprocess.run(["ip", "link", "del", V_ROOT], capture_output=True, timeout=20)
        for ns in (PUB, NAT):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def _payloads(pcap: Path) -> list[tuple[int, int, bytes]]:
    """(source port, destination port, TCP payload) of every IPv4/TCP packet in an Ethernet pcap."""
    data = pcap.read_bytes()
    out, off = [], 24
    while off + 16 <= len(data):
        incl = struct.unpack("<I", data[off + 8:off + 12])[0]
        pkt = data[off + 16:off + 16 + incl]
        off += 16 + incl
        if len(pkt) < 34 or pkt[12:14] != b"\x08\x00" or pkt[23] != 6:
            continue
        ihl = (pkt[14] & 15) * 4
        tcp = pkt[14 + ihl:]
        sport, dport = struct.unpack(">HH", tcp[:4])
        out.append((sport, dport, tcp[(tcp[12] >> 4) * 4:]))
    return out


def test_a_peer_behind_nat_trains_and_serves_a_joiner_through_the_relay(namespaces, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("COMMLAYER_SECRET", "fleet-netns-test-secret-0123")  # inherited by every device
    store_port, relay_port = free_port(), free_port()
    py = [sys.executable]
    hub = subprocess.Popen(["ip", "netns", "exec", PUB, *py, "-m", "commlayer.fleet.hub", "--store-port", str(store_port),
                            "--relay-port", str(relay_port), "--front-host", IP_PUB_N, "--for", "240"],
                           stdout=subprocess.PIPE, stderr=open(tmp_path / "hub.err", "wb"))  # noqa: SIM115
    pcap = tmp_path / "relay.pcap"
    dump = subprocess.Popen(["ip", "netns", "exec", PUB, "tcpdump", "-i", V_PUB_N, "-U", "-s", "0", "-w", str(pcap), "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fleet = None
    try:
        assert hub.stdout is not None and b"ready" in hub.stdout.readline(), "the hub did not start"
        fleet = LocalFleet(tmp_path, ["--rounds", "60", "--step-sleep", "0.05", "--audit", "--min-members", "3",
                                      "--dim", "64", "--hidden", "64"], store_addr=f"{IP_PUB_R}:{store_port}")
        pub = ["ip", "netns", "exec", PUB]
        in_pub = ["--store", f"{IP_PUB_N}:{store_port}", "--host", IP_PUB_N]
        fleet.spawn("p0", in_pub, prefix=pub)
        fleet.spawn("p1", in_pub, prefix=pub)
        deadline = time.monotonic() + 120
        while not (fleet.active("p0") and fleet.active("p1")):  # the NAT device gets the newest id: joiners try it first
            assert time.monotonic() < deadline, fleet.describe()
            time.sleep(0.1)
        fleet.spawn("nat", ["--store", f"{IP_PUB_N}:{store_port}", "--host", IP_HIDDEN, "--relay", f"{IP_PUB_N}:{relay_port}"],
                    prefix=["ip", "netns", "exec", NAT])
        fleet.spawn("joiner", in_pub, prefix=pub, standby=True)
        fleet.wait_round(5, 120)
        fleet.go("joiner")
        fleet.wait_all(180)
        for d in fleet.devices.values():
            assert d.proc.returncode == 0, fleet.describe()
        ids = {n: e["id"] for n, d in fleet.devices.items() for e in d.events() if e["event"] == "joined"}
        joined = next(e for e in fleet.devices["joiner"].events() if e["event"] == "joined")
        assert joined["how"].endswith(f"from peer {ids['nat']} (relay)"), joined
        a = audit(fleet.store)
        assert a.lost == 0 and a.duplicated == 0 and a.digest_mismatch == 0, a
        assert any(o == ids["nat"] for rec in a.records for o, *_ in rec["include"])  # the NAT device contributed
    finally:
        if fleet is not None:
            fleet.close()
        time.sleep(0.5)
        dump.terminate()
        dump.wait(timeout=10)
        hub.terminate()
        out, _ = hub.communicate(timeout=20)
    relayed = out.decode(errors="replace")
    assert '"forwarded"' in relayed and '"sessions": 0' not in relayed, relayed
    packets = _payloads(pcap)
    store_bytes = b"".join(p for s, d, p in packets if store_port in (s, d))
    other = b"".join(p for s, d, p in packets if store_port not in (s, d))
    assert b"commlayer/fleet/" in store_bytes  # the capture sees plaintext where there is some (the key names)
    for marker in (b'"include"', b'"cseq"', b'"samples"', b'"relay_front"'):  # round, info, meta and peer records
        assert marker not in store_bytes, marker
    assert len(other) > 64 * 64 * 8  # the state crossed this link (direct to the NAT device, relayed from it)
    for marker in (b"CLFS1", b'"numel"', b'"included"'):
        assert marker not in other, marker
