"""Unit tests of commlayer.wan's specs, profiles, loader, energy and the pipe model (no I/O)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from commlayer.wan import (PROFILES, LinkConfigError, LinkSpec, ScheduleStep, device_energy_j, link_energy_j,
                           load_links, profile_matrix, resolve_links, tcp_rate_mbit)
from commlayer.wan.pipe import LinkPipe


def test_schedule_overrides_in_order() -> None:
    s = LinkSpec(25.0, 100.0, schedule=(ScheduleStep(60.0, rate_mbit=10.0), ScheduleStep(90.0, delay_ms=5.0)))
    assert s.at(0.0).rate_mbit == 100.0
    assert s.at(60.0).rate_mbit == 10.0 and s.at(60.0).delay_ms == 25.0
    assert s.at(120.0).rate_mbit == 10.0 and s.at(120.0).delay_ms == 5.0


@pytest.mark.parametrize("kwargs, msg", [
    (dict(delay_ms=1, rate_mbit=-1), "link 2->3: expected rate_mbit > 0, got -1"),
    (dict(delay_ms=-2, rate_mbit=1), "link 2->3: expected delay_ms >= 0, got -2"),
    (dict(delay_ms=1, rate_mbit=1, loss=1.0), "link 2->3: expected loss < 1, got 1"),
    (dict(delay_ms=1, rate_mbit=1, jitter_ms="x"), "link 2->3: expected jitter_ms to be a number, got 'x'"),
    (dict(delay_ms=1, rate_mbit=1, schedule=(ScheduleStep(5), ScheduleStep(2))),
     "link 2->3 schedule[1]: expected at_s increasing, got 2 after 5"),
])
def test_validation_messages(kwargs: dict, msg: str) -> None:
    with pytest.raises(LinkConfigError) as e:
        LinkSpec(**kwargs).validate("link 2->3")
    assert str(e.value) == msg


@pytest.mark.parametrize("name", sorted(PROFILES))
@pytest.mark.parametrize("n", [1, 2, 5])
def test_every_profile_builds(name: str, n: int) -> None:
    m = profile_matrix(name, n)
    assert m.world_size == n
    for i, j, spec in m.pairs():
        assert i != j and spec.rate_mbit > 0 and spec.energy_nj_per_bit > 0
        # Profiles keep TCP's loss cap above the link rate, so rates are what they say, except
        # hetero's links into/out of mixed devices (up to 200 Mbit/s), where loss caps one TCP flow.
        capped = tcp_rate_mbit(spec.at(0), m.rtt_ms(i, j))
        assert capped == pytest.approx(spec.rate_mbit) or (name == "hetero" and 10 < capped < spec.rate_mbit)


def test_profile_numbers() -> None:
    assert profile_matrix("wan-20mbit-50ms", 2).rtt_ms(0, 1) == 50.0
    assert profile_matrix("wan-20mbit-50ms", 2).link(0, 1).rate_mbit == 20.0
    het = profile_matrix("hetero", 4)
    assert het.link(3, 0).rate_mbit == 8.0 and het.link(0, 1).rate_mbit == 200.0
    ic = profile_matrix("intercontinental", 4)
    assert 70 < ic.rtt_ms(0, 1) < 80 and ic.rtt_ms(0, 3) > 200


def test_file_with_devices_overrides_and_schedule(tmp_path: Path) -> None:
    f = tmp_path / "m.json"
    f.write_text(json.dumps({
        "devices": ["fiber-server", "my-box", "lte-phone"],
        "device_classes": {"my-box": {"up_mbit": 5, "down_mbit": 40, "access_delay_ms": 15, "energy_nj_per_bit": 283}},
        "links": [{"src": 0, "dst": 1, "rate_mbit": 100, "schedule": [{"at_s": 60, "rate_mbit": 10}]},
                  {"src": 2, "dst": "*", "loss": 0.001, "both": True}],
    }))
    m = load_links(f)
    assert m.world_size == 3 and m.devices[1] == "my-box"
    assert m.link(0, 1).rate_mbit == 100 and m.link(0, 1).at(61).rate_mbit == 10
    assert m.link(1, 0).rate_mbit == 5 and m.link(1, 0).delay_ms == 15 + 10 + 2
    assert m.link(2, 0).loss == 0.001 and m.link(0, 2).loss == 0.001 and m.link(0, 1).loss == 0
    assert resolve_links(str(f), 3) == m


@pytest.mark.parametrize("doc, msg", [
    ({"world_size": 4, "default": {"delay_ms": 1, "rate_mbit": 5}, "links": [{"src": 2, "dst": 3, "rate_mbit": -1}]},
     "link 2->3: expected rate_mbit > 0, got -1"),
    ({"world_size": 2, "links": [{"src": 0, "dst": 1, "delay_ms": 1, "rate_mbit": 1}]},
     "link 1->0: not covered by profile/devices/default or links"),
    ({"world_size": 2, "default": {"delay_ms": 1}}, "missing required field rate_mbit"),
    ({"world_size": 2, "default": {"delay_ms": 1, "rate_mbit": 1}, "links": [{"src": 5, "dst": 1}]},
     "expected src to be a rank in [0, 2)"),
    ({"devices": ["nope"]}, "unknown device class(es) ['nope']"),
    ({"world_size": 2, "profile": "lte", "colour": 1}, "unknown key(s) ['colour']"),
    ({"world_size": 2, "default": {"delay_ms": 1, "rate_mbit": 1, "schedule": [{"rate_mbit": 1}]}},
     "schedule[0]: expected an object with at_s"),
])
def test_loader_errors(doc: dict, msg: str) -> None:
    with pytest.raises(LinkConfigError) as e:
        resolve_links(doc, doc.get("world_size", 1))
    assert msg in str(e.value)


def test_resolve_unknown_and_size_mismatch() -> None:
    with pytest.raises(LinkConfigError, match="neither a profile"):
        resolve_links("no-such-profile", 2)
    with pytest.raises(LinkConfigError, match="file is for 3 ranks, expected 2"):
        resolve_links({"world_size": 3, "profile": "lte"}, 2)


def test_energy() -> None:
    m = profile_matrix("hetero", 4)  # fiber, home, wifi, lte
    e = device_energy_j([1_000_000] * 4, m)
    assert e[3] == pytest.approx(8e6 * 438e-9) and e[2] == pytest.approx(8e6 * 283e-9)
    assert e[3] > e[2] > e[0]
    assert link_energy_j({(3, 0): 1000}, m)[3] == pytest.approx(8000 * 438e-9)
    with pytest.raises(ValueError):
        device_energy_j({7: 1}, m)


def test_mathis_bound() -> None:
    p = LinkSpec(20.0, 50.0, loss=0.001).at(0)
    expected = 1448 * 8 / 0.04 * math.sqrt(1.5) / math.sqrt(0.001) / 1e6
    assert tcp_rate_mbit(p, 40.0) == pytest.approx(expected) and expected < 50


def test_pipe_carries_full_rate_with_bdp_in_flight() -> None:
    # 100 Mbit/s, 50 ms: 1 MB offered at t=0 leaves at 100 Mbit/s, first byte after the delay.
    pipe = LinkPipe(LinkSpec(50.0, 100.0), t0=0.0, seed=1, stream=True)
    releases = [pipe.admit(12500, 0.0) for _ in range(80)]
    assert releases[0] == pytest.approx(0.001 + 0.05)
    assert releases[-1] == pytest.approx(80 * 12500 * 8 / 100e6 + 0.05)


def test_pipe_schedule_changes_rate() -> None:
    pipe = LinkPipe(LinkSpec(10.0, 100.0, schedule=(ScheduleStep(1.0, rate_mbit=10.0),)), 0.0, 1, stream=True)
    assert pipe.admit(12500, 0.5) == pytest.approx(0.5 + 0.001 + 0.01)
    assert pipe.admit(12500, 1.5) == pytest.approx(1.5 + 0.01 + 0.01)


def test_pipe_jitter_is_normal_and_seeded() -> None:
    def delays(seed: int) -> list[float]:
        pipe = LinkPipe(LinkSpec(50.0, 1000.0, jitter_ms=5.0), 0.0, seed, stream=False)
        return [pipe.admit(100, t) - t for t in range(2000)]  # 1 s apart: no FIFO interaction
    d = delays(3)
    assert d == delays(3) and d != delays(4)
    assert statistics.mean(d) == pytest.approx(0.050, abs=0.0005)
    assert statistics.stdev(d) == pytest.approx(0.005, rel=0.08)


def test_pipe_packet_loss_rate_and_drop_tail() -> None:
    pipe = LinkPipe(LinkSpec(10.0, 1000.0, loss=0.05), 0.0, 7, stream=False)
    lost = sum(pipe.admit(100, t * 0.01) is None for t in range(10000))
    assert abs(lost - 500) < 4 * math.sqrt(10000 * 0.05 * 0.95)
    full = LinkPipe(LinkSpec(10.0, 1.0, queue_ms=100.0), 0.0, 7, stream=False)
    kept = sum(full.admit(1250, 0.0) is not None for _ in range(100))  # 10 ms each at 1 Mbit/s
    assert kept == 11  # 100 ms of buffer, plus the packet being serialised


def test_pipe_stream_loss_stalls() -> None:
    spec = LinkSpec(20.0, 1000.0, loss=0.01)
    pipe = LinkPipe(spec, 0.0, 5, stream=True)
    rel = [pipe.admit(1448, t * 1.0) - t * 1.0 for t in range(3000)]
    stalls = sum(r > 0.05 for r in rel)
    assert stalls == pipe.stalls and abs(stalls - 30) < 4 * math.sqrt(30)
    assert max(rel) == pytest.approx(0.02 + 1448 * 8 / pipe.rate_bytes_per_s(0) / 8 + 0.04, rel=0.01)


def test_bufferbloat_profiles_carry_their_uplink_queue() -> None:
    from commlayer.wan import DEVICE_CLASSES, access_links

    m = profile_matrix("dsl-bufferbloat", 3)
    spec = m.link(0, 1)
    assert (spec.rate_mbit, spec.queue_ms) == (1.0, 3000.0)
    assert spec.queue_s(spec.at(0.0)) == 3.0
    home = profile_matrix("home-bufferbloat", 2)
    assert home.link(0, 1).queue_ms == 1000.0 and home.link(1, 0).queue_ms == 500.0  # the sender's modem
    links = access_links([DEVICE_CLASSES["dsl-bloated"], DEVICE_CLASSES["home-broadband"]])
    assert (links[0].up_mbit, links[0].down_mbit, links[0].up_queue_ms) == (1.0, 10.0, 3000.0)
    assert links[1].up_queue_ms == 50.0


def test_bloated_packet_pipe_queues_seconds_before_dropping() -> None:
    """A 1 Mbit/s pipe with 3 s of buffer holds a 3 s backlog (bufferbloat) and drops only beyond it."""
    pipe = LinkPipe(LinkSpec(10.0, 1.0, queue_ms=3000.0), 0.0, 1, stream=False)
    releases = [pipe.admit(1500, 0.0) for _ in range(400)]  # 400 x 1500 B = 4.8 s at 1 Mbit/s, all at once
    kept = [r for r in releases if r is not None]
    assert pipe.dropped_units > 0
    assert 2.9 <= max(kept) - 0.01 <= 3.1 + 1500 * 8 / 1e6
    assert len(kept) == pytest.approx(3.0 * 1e6 / 8 / 1500, abs=2)


def test_access_link_validation() -> None:
    from commlayer.wan import AccessLink

    with pytest.raises(ValueError, match="up_mbit: expected a positive number, got 0"):
        AccessLink(0, 10)
