"""``commlayer launch --fleet``: an emulated elastic fleet from the command line (real device processes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_launch_fleet_churns_devices_and_reports_a_clean_ledger(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "commlayer.cli", "launch", "--fleet", "--nproc", "3", "--rounds", "16",
                          "--churn-every", "6", "--step-sleep", "0.03", "--timeout", "240", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads(out.stdout[out.stdout.index("{"):])
    assert report["audit"]["lost"] == 0 and report["audit"]["duplicated"] == 0 and report["audit"]["rounds"] >= 16
    assert report["events"] and all(e["how"] in ("left", "killed") for e in report["events"])
    assert report["join_s"], report  # the joiners fetched the state from a live device
    assert report["final_loss"] == report["final_loss"]  # a number, not NaN


def test_launch_fleet_rejects_bad_arguments_naming_them() -> None:
    out = subprocess.run([sys.executable, "-m", "commlayer.cli", "launch", "--fleet", "--nproc", "2", "--slow", "2"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--slow < --nproc" in out.stderr, out.stderr
