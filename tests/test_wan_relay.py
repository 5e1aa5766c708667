"""Relay mode (no root): measured rate, RTT, schedule, jitter and loss against the configuration.

Every test moves at most a few seconds of data; relays run in their own process.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Iterator

import pytest

from commlayer.wan import LinkMatrix, LinkSpec, ScheduleStep, emulated_world, profile_matrix, start_relays
from commlayer.wan.matrix import replace_links, uniform_matrix
from commlayer.wan.probe import bulk, ping, serve_in_thread
from commlayer.wan.spec import tcp_rate_mbit
from commlayer.wan.world import free_port

HOST = "127.0.0.1"


def _clean(m: LinkMatrix) -> LinkMatrix:
    """The matrix without jitter and loss (rate and delay accuracy are tested on these)."""
    return replace_links(m, {(i, j): s.with_(jitter_ms=0.0, loss=0.0) for i, j, s in m.pairs()})


def _rate_window(timeline: list[list[float]], t_from: float, t_to: float) -> float:
    """Mbit/s received between two absolute times, from a probe timeline."""
    pts = [(t, b) for t, b in timeline if t_from <= t <= t_to]
    (ta, ba), (tb, bb) = pts[0], pts[-1]
    return (bb - ba) * 8 / (tb - ta) / 1e6


@pytest.fixture
def server_port() -> Iterator[int]:
    port = free_port()
    thread, stop = serve_in_thread(HOST, port, timeout_s=60.0, warmup_s=0.3)
    try:
        yield port
    finally:
        stop.set()
        thread.join(timeout=5.0)


@pytest.mark.parametrize("name, seconds", [
    ("wan-20mbit-50ms", 2.0), ("home-broadband", 2.0), ("intercontinental", 1.5), ("lte", 2.5), ("datacenter", 1.0),
])
def test_profile_rate_and_rtt(name: str, seconds: float, server_port: int) -> None:
    m = _clean(profile_matrix(name, 2))
    spec, rtt = m.link(0, 1), m.rtt_ms(0, 1)
    with start_relays(m, [free_port(), server_port]) as relays:
        port = relays.relay_ports[(0, 1)]
        rtts = ping(HOST, port, count=12, interval_s=0.01)
        # Offer about `seconds` worth of data, so socket buffers do not prolong the drain.
        res = bulk(HOST, port, seconds, max_bytes=int(min(spec.rate_mbit, 400) * 1e6 / 8 * seconds))
    measured_rtt = statistics.median(rtts)
    print(f"{name}: rate {spec.rate_mbit} -> {res['rate_mbit']:.2f} Mbit/s, rtt {rtt} -> {measured_rtt:.2f} ms")
    assert abs(measured_rtt - rtt) <= max(0.05 * rtt, 1.0)
    if spec.rate_mbit <= 200:
        assert res["rate_mbit"] == pytest.approx(spec.rate_mbit, rel=0.05)
    else:  # datacenter 1 Gbit/s: the relay must at least sustain 200 Mbit/s and never exceed the rate
        assert 200 <= res["rate_mbit"] <= 1.05 * spec.rate_mbit


def test_schedule_change_at_expected_time(server_port: int) -> None:
    spec = LinkSpec(10.0, 100.0, schedule=(ScheduleStep(1.5, rate_mbit=10.0),))
    m = uniform_matrix("sched", 2, spec)
    # The schedule's origin lies after the relays' start-up (a relay process imports torch: seconds on
    # a loaded machine), so the windows below always fall inside the measurement.
    t0 = time.monotonic() + 8.0
    with start_relays(m, [free_port(), server_port], t0=t0) as relays:
        res = bulk(HOST, relays.relay_ports[(0, 1)], seconds=max(3.0, t0 + 2.6 - time.monotonic()), max_bytes=150_000_000)
    tl = res["timeline"]
    before = _rate_window(tl, t0 + 0.5, t0 + 1.4)
    after = _rate_window(tl, t0 + 1.8, t0 + 2.6)
    assert before == pytest.approx(100.0, rel=0.05) and after == pytest.approx(10.0, rel=0.05)
    # The change shows up where the 100 ms rate first drops below 30 Mbit/s.
    change = next(t for (t, b), (t2, b2) in zip(tl, tl[5:]) if t > t0 + 0.5 and (b2 - b) * 8 / (t2 - t) / 1e6 < 30)
    assert abs(change - (t0 + 1.5)) < 0.15


def test_jitter_distribution(server_port: int) -> None:
    m = uniform_matrix("jit", 2, LinkSpec(20.0, 50.0))
    m = replace_links(m, {(0, 1): LinkSpec(20.0, 50.0, jitter_ms=5.0)})
    with start_relays(m, [free_port(), server_port], seed=11) as relays:
        rtts = ping(HOST, relays.relay_ports[(0, 1)], count=70, interval_s=0.005)
    mean, sd = statistics.mean(rtts), statistics.stdev(rtts)
    within = sum(abs(r - mean) <= 5.0 for r in rtts) / len(rtts)
    # The relay and the pinger are Python processes: a loaded machine only ever adds delay (the full
    # suite once read a 42.1 ms mean), so the centre may sit up to 3 ms late, never early.
    assert -2.0 <= statistics.median(rtts) - 40.0 <= 3.0, (mean, statistics.median(rtts))
    assert sd == pytest.approx(5.0, rel=0.3)
    assert 0.5 < within < 0.85  # ~68 % within one sigma for a normal distribution


def test_loss_follows_tcp_model(server_port: int) -> None:
    lossy = LinkSpec(20.0, 50.0, loss=0.001)
    m = replace_links(uniform_matrix("loss", 2, LinkSpec(20.0, 50.0)), {(0, 1): lossy})
    expected = tcp_rate_mbit(lossy.at(0), 40.0)  # Mathis cap, ~11 Mbit/s
    with start_relays(m, [free_port(), server_port], seed=3) as relays:
        res = bulk(HOST, relays.relay_ports[(0, 1)], seconds=2.0)
        st = relays.stats()[(0, 1)]
    assert res["rate_mbit"] == pytest.approx(expected, rel=0.05)
    # Each chunk of k segments stalls with probability 1 - (1 - p)^k.
    k = math.ceil(st["bytes"] / st["units"] / 1448)
    p_chunk = 1 - (1 - 0.001) ** k
    assert abs(st["stalls"] - st["units"] * p_chunk) < 4 * math.sqrt(st["units"] * p_chunk) + 2


def test_emulated_world_env_contract() -> None:
    with emulated_world(3, "hetero", mode="relay") as w:
        env = w.env(1)
        assert env["RANK"] == "1" and env["WORLD_SIZE"] == "3" and env["LOCAL_WORLD_SIZE"] == "3"
        assert env["MASTER_ADDR"] == "127.0.0.1" and int(env["MASTER_PORT"]) > 0
        import json
        over = json.loads(env["COMMLAYER_CONNECT_OVERRIDES"])
        assert set(over) == {"0", "2"} and over["2"].startswith("tcp://127.0.0.1:")
        assert int(env["COMMLAYER_PORT"]) == int(w.envs[1]["COMMLAYER_PORT"]) and w.prefix(1) == []
        assert w.bytes_sent() == [0, 0, 0] and w.energy_j() == [0.0, 0.0, 0.0]


def test_relay_in_thread_and_close_is_clean(server_port: int) -> None:
    m = profile_matrix("wan-20mbit-50ms", 2)
    relays = start_relays(m, [free_port(), server_port], in_thread=True)
    try:
        assert statistics.median(ping(HOST, relays.relay_ports[(0, 1)], count=3)) == pytest.approx(50.0, abs=2.0)
    finally:
        relays.close()
        relays.close()
