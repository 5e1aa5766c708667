"""The ``commlayer`` CLI: argument errors, launch, bench, probe and demo --quick (real processes, relay mode)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from commlayer.cli import main

ALLREDUCE_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch, torch.distributed as dist
    dist.init_process_group("zmq")
    t = torch.full((1000,), float(dist.get_rank() + 1))
    dist.all_reduce(t)
    n = dist.get_world_size()
    assert torch.all(t == n * (n + 1) / 2), t[:3]
    print("sum ok", os.environ["RANK"], os.environ["LOCAL_WORLD_SIZE"], flush=True)
    rank = dist.get_rank()
    dist.destroy_process_group()
    sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 and rank == 1 else 0)
""")


def test_help_and_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "launch" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


def test_bad_profile_lists_known_ones(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text("pass\n")
    assert main(["launch", "--nproc", "2", "--links", "no-such-profile", str(script)]) == 2
    err = capsys.readouterr().err
    assert "no-such-profile" in err and "wan-20mbit-50ms" in err and "datacenter" in err


def test_argument_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["launch", "--nproc", "2", "missing_script.py"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["launch", "--nproc", "0", "x.py"]) == 2
    assert "expected >= 1" in capsys.readouterr().err
    assert main(["bench", "--algos", "spiral", "--nproc", "2"]) == 2
    assert "spiral" in capsys.readouterr().err
    assert main(["bench", "--min-bytes", "1X", "--nproc", "2", "--algos", "ring", "--codecs", ""]) == 2
    assert "1X" in capsys.readouterr().err
    assert main(["demo", "--configs", "mpi:dense"]) == 2
    assert "BACKEND:METHOD" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["launch", "--mode", "carrier-pigeon", "--nproc", "2", "x.py"])


@pytest.mark.timeout(120)
def test_launch_allreduce_and_failure_code(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "allreduce.py"
    script.write_text(ALLREDUCE_SCRIPT)
    assert main(["launch", "--nproc", "3", "--links", "datacenter", "--timeout", "90", str(script)]) == 0
    out = capfd.readouterr().out
    assert all(f"[rank {r}] sum ok {r} 3" in out for r in range(3)), out
    assert main(["launch", "--nproc", "2", "--links", "datacenter", "--timeout", "90", str(script), "7"]) == 7


@pytest.mark.timeout(150)
def test_bench_tiny_sweep_writes_json_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    rc = main(["bench", "--nproc", "2", "--links", "datacenter", "--mode", "relay", "--algos", "ring,tree", "--codecs", "",
               "--min-bytes", "4K", "--max-bytes", "64K", "--rounds", "1", "--budget-bytes", "64K", "--json", str(js), "--png", str(png)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "busbw" in out and "64.0 KiB" in out
    doc = json.loads(js.read_text())
    assert doc["nproc"] == 2 and len(doc["points"]) == 2 * 3
    assert all(p["time_s"] > 0 and p["profile"] == "datacenter" for p in doc["points"])
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.timeout(120)
def test_probe_measures_emulated_links(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["probe", "--nproc", "2", "--links", "wan-20mbit-50ms", "--pings", "3", "--train-bytes", "256K", "--json"])
    assert rc == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted((r["src"], r["dst"]) for r in recs) == [(0, 1), (1, 0)]
    for r in recs:  # measured beside the emulator's configured values (one-way delay, rate)
        assert r["event"] == "links" and r["configured_mbit"] == 20.0
        # scheduling delays on a loaded machine only add to latency; the train may undershoot the rate
        assert r["configured_latency_ms"] * 0.9 - 3 < r["latency_ms"] < r["configured_latency_ms"] * 3 + 20, r
        assert 2.0 < r["bandwidth_mbit"] < 20.0 * 1.25, r


def test_probe_rejects_one_rank_and_old_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--nproc", "1"]) == 2
    assert "--nproc: expected >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # the removed fallback's flags are refused, not ignored
        main(["probe", "--bulk-bytes", "1M"])
    assert exc.value.code == 2


@pytest.mark.timeout(150)
def test_demo_quick_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png, js = tmp_path / "d.png", tmp_path / "d.json"
    rc = main(["demo", "--quick", "--nproc", "2", "--mode", "relay", "--png", str(png), "--json", str(js),
               "--configs", "zmq:dense;zmq:hook:powersgd:rank=2+ef;zmq:diloco:4"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "s/step" in out and "speed-up" in out and "training" in out
    doc = json.loads(js.read_text())
    assert [r["config"] for r in doc["rows"]] == ["zmq:dense", "zmq:hook:powersgd:rank=2+ef", "zmq:diloco:4"]
    assert all(r["bytes_per_step"] > 0 for r in doc["rows"])
    assert png.read_bytes()[:4] == b"\x89PNG"
