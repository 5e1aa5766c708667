"""``commlayer simulate`` end to end (no real ranks): table, JSON, PNG, and clear errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from commlayer.cli import main

pytestmark = pytest.mark.unit


def test_simulate_writes_table_json_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    js, png = tmp_path / "s.json", tmp_path / "s.png"
    rc = main(["simulate", "--nodes", "4,16", "--topology", "ring,ps-async,gossip:torus", "--codec", ";int8+ef",
               "--links", "hetero", "--bytes", "256K", "--rounds", "3", "--churn", "0.05,0.5", "--json", str(js), "--png", str(png)])
    assert rc == 0
    out = capsys.readouterr()
    assert "step time" in out.out and "simulate [" in out.err  # table on stdout, progress bar on stderr
    rows = json.loads(js.read_text())["rows"]
    assert len(rows) == 2 * 3 * 2
    assert {r["topology"] for r in rows} == {"ring", "ps-async", "gossip:torus"}
    assert all(r["step_time_s"] > 0 and r["energy_per_device_J"] > 0 for r in rows)
    exact = {(r["nodes"], r["topology"]): r for r in rows if r["codec"] == "exact"}
    comp = {(r["nodes"], r["topology"]): r for r in rows if r["codec"] == "int8+ef"}
    assert comp[(4, "gossip:torus")]["bytes_per_device"] < exact[(4, "gossip:torus")]["bytes_per_device"] / 3
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv,needle", [
    (["--topology", "star"], "expected one of"),
    (["--topology", "gossip:hypercube"], "expected a graph in"),
    (["--links", "no-such-profile"], "--links"),
    (["--nodes", "1"], "sizes >= 2"),
    (["--churn", "0.1"], "LEAVE,REJOIN"),
    (["--codec", "nosuchcodec"], "--codec"),
])
def test_simulate_rejects_bad_input_clearly(argv: list[str], needle: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["simulate", "--rounds", "1", "--json", str(tmp_path / "x.json"), "--png", str(tmp_path / "x.png"), *argv])
    assert rc == 2
    assert needle in capsys.readouterr().err
