#!/usr/bin/env python3
"""Issue 10's structure figures for several git revisions side by side (a markdown table).

    python scripts/structure_report.py [REV ...] [--list]     # default: 50d058c 59a773b HEAD

Each revision is exported with ``git archive`` into a temporary directory and measured by the
scripts of *this* checkout (the same rules for every column): ``scripts/structure_counts.py``
(launchers, free_port helpers, env reads outside settings, sys.path inserts, modules over 350)
and ``scripts/import_cycles.py``, plus the counts below, all from an AST walk (nothing is
imported or run):

* algorithm decisions: places in the library (commlayer/, codecs/, topologies/) outside
  ``topologies/registry.py`` that decide which all-reduce runs by its name: a comparison of a
  value named ``*algo*`` against algorithm names ("auto", "ring", "tree", "chain", "ps"), a size
  rule choosing between two names (``"tree" if ... else "ring"``), or a literal list of names.
* aggregation decisions: the same for the codec aggregation mode: a comparison of a value named
  ``*mode*`` against "allreduce", "allgather", "majority_vote", "powersgd", outside
  ``codecs/aggregate.py``.
* the base classes of ``Transport`` (mixins that share its attributes; the receiver is composed since
  this branch).
* modules over 300 lines, and the five widest modules with their line counts.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("commlayer", "codecs", "topologies")
_SKIP = {".venv", ".git", "build", "__pycache__"}
ALGOS = {"auto", "ring", "tree", "chain", "ps"}
MODES = {"allreduce", "allgather", "majority_vote", "powersgd"}
HOMES = {"algo": "topologies/registry.py", "mode": "codecs/aggregate.py"}


def _ident(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Call):
        return _ident(node.func)
    return ""


def _names(node: ast.AST, vocab: set[str]) -> int:
    """How many of ``vocab`` a constant or a literal tuple/list/set of constants holds (0: something else)."""
    if isinstance(node, ast.Constant):
        return 1 if node.value in vocab else 0
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and node.elts:
        hits = [_names(e, vocab) for e in node.elts]
        return sum(hits) if all(hits) else 0
    return 0


def decisions(tree: ast.AST, key: str, vocab: set[str]) -> int:
    """Comparisons of a ``*key*`` value against names of ``vocab``; for algorithms also size rules and name lists."""
    n = 0
    counted: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(key in _ident(s).lower() for s in sides) and any(_names(s, vocab) for s in sides):
                n += 1
                counted.update(id(x) for s in sides for x in ast.walk(s))
        elif key == "algo" and isinstance(node, ast.IfExp) and _names(node.body, vocab) and _names(node.orelse, vocab):
            n += 1
            counted.update(id(x) for x in ast.walk(node))
    if key == "algo":
        for node in ast.walk(tree):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and id(node) not in counted and _names(node, vocab) >= 3:
                n += 1
    return n


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts) & _SKIP))


def measure(root: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """The figures of one checkout, and the files behind each count."""
    out: dict[str, str] = {}
    where: dict[str, list[str]] = {}
    counts = subprocess.run([sys.executable, str(ROOT / "scripts" / "structure_counts.py"), "--root", str(root), "--list"],
                            capture_output=True, text=True, timeout=300, check=True).stdout
    key = ""
    for line in counts.splitlines():
        if line.startswith(" "):
            where.setdefault(key, []).append(line.strip())
        elif line.strip():
            key, value = line.split()
            out[key] = value
    cyc = subprocess.run([sys.executable, str(ROOT / "scripts" / "import_cycles.py"), "--root", str(root)],
                         capture_output=True, text=True, timeout=300).stdout
    out["import_cycles"] = cyc.strip().splitlines()[-1].split()[0]
    where["import_cycles"] = [x for x in cyc.splitlines() if x.startswith("cycle")]
    widths: list[tuple[int, str]] = []
    for kind in ("algo", "mode"):
        where[f"{kind}_decisions"] = []
    for f in _files(root):
        rel = str(f.relative_to(root))
        text = f.read_text()
        widths.append((len(text.splitlines()), rel))
        if rel.split("/")[0] not in LIBRARY:
            continue
        tree = ast.parse(text, rel)
        for kind, vocab in (("algo", ALGOS), ("mode", MODES)):
            if rel != HOMES[kind]:
                k = decisions(tree, kind, vocab)
                if k:
                    where[f"{kind}_decisions"].append(f"{rel}: {k}")
    for kind in ("algo", "mode"):
        out[f"{kind}_decisions"] = (f"{sum(int(x.rsplit(': ', 1)[1]) for x in where[f'{kind}_decisions'])} in "
                                    f"{len(where[f'{kind}_decisions'])} modules")
    engine = root / "commlayer" / "transport" / "engine.py"
    bases = [_ident(b) for node in ast.walk(ast.parse(engine.read_text())) if isinstance(node, ast.ClassDef)
             and node.name == "Transport" for b in node.bases]
    out["transport_bases"] = ", ".join(bases) or "none"
    widths.sort(reverse=True)
    out["over_300"] = str(sum(1 for n, _ in widths if n > 300))
    where["over_300"] = [f"{rel}: {n}" for n, rel in widths if n > 300]
    out["widest"] = ", ".join(f"{rel} {n}" for n, rel in widths[:5])
    return out, where


ROWS = [("algo_decisions", "places deciding the all-reduce algorithm by name (library)"),
        ("mode_decisions", "places deciding the codec aggregation mode by name (library)"),
        ("launchers", "modules starting one process per rank"),
        ("free_ports", "free_port helpers (+ inline bind-to-port-0)"),
        ("env_reads", "COMMLAYER_* env reads outside settings.py"),
        ("import_cycles", "import cycles (library, all imports)"),
        ("transport_bases", "mixins of Transport"),
        ("sys_path_inserts", "sys.path inserts in tests/ and benchmarks/"),
        ("over_350", "modules over 350 lines"),
        ("over_300", "modules over 300 lines"),
        ("widest", "widest modules (lines)")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("revs", nargs="*", default=["50d058c", "59a773b", "HEAD"])
    ap.add_argument("--list", action="store_true", help="name the files behind each count, per revision")
    args = ap.parse_args(argv)
    cols: list[tuple[str, dict[str, str], dict[str, list[str]]]] = []
    for rev in args.revs:
        sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True, timeout=30,
                             check=True).stdout.strip()
        with tempfile.TemporaryDirectory(prefix="structure-") as tmp:
            archive = subprocess.run(["git", "archive", sha], cwd=ROOT, capture_output=True, timeout=120, check=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, timeout=120, check=True)
            figures, where = measure(Path(tmp))
        cols.append((f"{rev} ({sha})" if rev != sha else sha, figures, where))
    print("| figure | " + " | ".join(c[0] for c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for key, label in ROWS:
        print(f"| {label} | " + " | ".join(c[1].get(key, "-") for c in cols) + " |")
    if args.list:
        for name, _, where in cols:
            print(f"\n## {name}")
            for key, found in where.items():
                if found:
                    print(f"{key}:\n    " + "\n    ".join(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
