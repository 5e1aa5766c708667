"""The demo's plot works on a plain install: without matplotlib it is drawn as SVG (no crash)."""

from __future__ import annotations

import sys
import xml.dom.minidom
from pathlib import Path

import pytest

from commlayer.demo.report import plot

RUNS = [{"config": c, "label": c, "target_loss": 1.0,
         "curve": [{"time_s": t, "loss": 2.0 / (1 + t), "acc": 10 + 5 * t} for t in (0.1, 1.0, 3.0)]}
        for c in ("gloo:dense", "zmq:dense")]


def test_without_matplotlib_an_svg_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` sees when it is not installed
    written, note = plot(RUNS, str(tmp_path / "demo.png"), "title")
    assert written == str(tmp_path / "demo.svg") and "matplotlib is not installed" in note
    doc = xml.dom.minidom.parse(written)
    assert len(doc.getElementsByTagName("polyline")) == 4  # loss and accuracy, per configuration
    assert not (tmp_path / "demo.png").exists()


def test_with_matplotlib_the_png_is_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the bench extra draws the PNG")
    written, note = plot(RUNS, str(tmp_path / "demo.png"), "title")
    assert written.endswith(".png") and note == ""
    assert Path(written).read_bytes()[:4] == b"\x89PNG"
