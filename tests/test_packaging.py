"""The package layout: codecs/ and topologies/ install as commlayer.codecs / commlayer.topologies."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_subpackages_import_from_mapped_directories() -> None:
    import commlayer.codecs
    import commlayer.topologies

    assert Path(commlayer.codecs.__file__).parent.name == "codecs"
    assert Path(commlayer.topologies.__file__).parent.name == "topologies"
    # The standard library's codecs module must stay untouched.
    import codecs

    assert hasattr(codecs, "lookup")


def test_wheel_contains_mapped_packages(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        timeout=240,
    )
    (wheel,) = tmp_path.glob("commlayer-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "commlayer/codecs/__init__.py" in names
    assert "commlayer/topologies/__init__.py" in names
    assert not any(n.startswith("codecs/") or n.startswith("topologies/") for n in names)
    # Every module of every package directory is in the wheel (a sub-package missing from pyproject's
    # list works in an editable install and is silently absent from a real one).
    for top, installed in (("commlayer", "commlayer"), ("codecs", "commlayer/codecs"), ("topologies", "commlayer/topologies")):
        for path in (ROOT / top).rglob("*.py"):
            rel = f"{installed}/{path.relative_to(ROOT / top).as_posix()}"
            assert rel in names, f"{rel} is not in the wheel: add its package to [tool.setuptools] packages"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[torch.backends]" in text and "zmq = commlayer._autoload:autoload" in text


def test_import_torch_registers_zmq_without_importing_commlayer() -> None:
    code = "import torch.distributed as dist, sys; print('zmq' in dist.Backend.backend_list, 'commlayer.backend.process_group' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "False"]


def test_import_commlayer_defers_torch_to_its_entry_point() -> None:
    """The emulator's helper processes import commlayer without torch; a later torch import still registers zmq."""
    code = ("import sys, commlayer, commlayer.wan.relay, commlayer.testing; t = 'torch' in sys.modules; "
            "import torch.distributed as dist; print(t, 'zmq' in dist.Backend.backend_list)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "True"]
    off = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"})
    assert off.stdout.split() == ["True", "True"]  # torch will not load the entry point: commlayer registers eagerly
