"""ruff and mypy on the library, so the README's one test command (and .ci/run) runs them.

Configuration: ``[tool.ruff]`` and ``[tool.mypy]`` in pyproject.toml; mypy sees the installed
layout through scripts/typecheck.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(120)
def test_ruff_passes() -> None:
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                         text=True, timeout=100)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mypy_passes() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "typecheck.py")], cwd=ROOT, capture_output=True,
                         text=True, timeout=580)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Success: no issues found" in out.stdout


@pytest.mark.timeout(120)
def test_no_import_cycles() -> None:
    """No cycle among the library's modules, counting imports inside functions and under TYPE_CHECKING."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "import_cycles.py")], cwd=ROOT, capture_output=True,
                         text=True, timeout=100)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 import cycle(s)" in out.stdout, out.stdout


@pytest.mark.timeout(120)
def test_tests_and_benchmarks_share_code_only_through_the_package() -> None:
    """tests/ and benchmarks/ never put each other on sys.path: shared harnesses live in commlayer.testing."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "structure_counts.py"), "--list"], cwd=ROOT,
                         capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stdout + out.stderr
    counts = {line.split()[0]: int(line.split()[1]) for line in out.stdout.splitlines() if not line.startswith(" ")}
    assert counts["sys_path_inserts"] == 0, out.stdout
