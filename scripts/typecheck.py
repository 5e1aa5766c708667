#!/usr/bin/env python3
"""Type-checks the library (commlayer/, codecs/, topologies/) with mypy, as the package installs.

    python scripts/typecheck.py [extra mypy arguments]

``codecs/`` and ``topologies/`` install as ``commlayer.codecs`` / ``commlayer.topologies``
(pyproject's package-dir), which mypy cannot see through setuptools' editable finder, and a
top-level ``codecs`` would shadow the standard library. So this builds the installed layout from
symlinks in a temporary directory and runs ``mypy -p commlayer`` on it with the repository's
``[tool.mypy]`` settings. Exit code: mypy's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_layout(dest: Path) -> Path:
    """``dest/commlayer`` with every entry of commlayer/ plus codecs/ and topologies/ as sub-packages."""
    pkg = dest / "commlayer"
    pkg.mkdir()
    for entry in sorted((ROOT / "commlayer").iterdir()):
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    (pkg / "codecs").symlink_to(ROOT / "codecs")
    (pkg / "topologies").symlink_to(ROOT / "topologies")
    return pkg


def main(argv: list[str] | None = None) -> int:
    extra = list(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="commlayer-typecheck-") as tmp:
        build_layout(Path(tmp))
        env = {**os.environ, "MYPYPATH": tmp}
        # The cache (gitignored) keys on the symlinks' resolved files, so it survives between runs.
        cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "--cache-dir",
               str(ROOT / ".mypy_cache"), "-p", "commlayer", *extra]
        return subprocess.run(cmd, cwd=tmp, env=env, timeout=900).returncode


if __name__ == "__main__":
    sys.exit(main())
