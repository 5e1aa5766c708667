#!/usr/bin/env python3
"""Counts issue 10 asks for, from an AST walk of a checkout (nothing is imported or run).

    python scripts/structure_counts.py [--root DIR] [--list]

* launchers: modules that start one process per rank: a ``Process(...)`` or ``Popen(...)`` call
  inside a loop or comprehension over ranks (its target is named ``r``/``rank``/``i``).
* free ports: functions named ``*free_port*`` plus inline ``bind((host, 0))`` outside them.
* env reads outside settings: ``os.environ[...]``, ``os.environ.get``, ``os.getenv`` (or a private
  ``_env_*`` helper) of a ``COMMLAYER_*`` literal in commlayer/, codecs/, topologies/ except
  commlayer/settings.py.
* modules over 350 lines (all .py in the repository, and in the library alone).
* sys.path inserts between tests/ and benchmarks/.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

LIBRARY = ("commlayer", "codecs", "topologies")
_SKIP = {".venv", ".git", "build", "__pycache__"}


def py_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts) & _SKIP))


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def _loop_targets(node: ast.AST) -> set[str]:
    targets: list[ast.AST] = []
    if isinstance(node, ast.For):
        targets = [node.target]
    elif isinstance(node, (ast.ListComp, ast.GeneratorExp, ast.SetComp, ast.DictComp)):
        targets = [g.target for g in node.generators]
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


def launchers(tree: ast.AST) -> int:
    count = 0

    def visit(node: ast.AST, in_rank_loop: bool) -> None:
        nonlocal count
        here = in_rank_loop or bool(_loop_targets(node) & {"r", "rank", "i"})
        if isinstance(node, ast.Call) and _name(node.func) in ("Process", "Popen") and here:
            count += 1
        for child in ast.iter_child_nodes(node):
            visit(child, here)

    visit(tree, False)
    return count


def free_ports(tree: ast.AST) -> int:
    n = 0
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name.endswith("free_port"):
            n += 1
            inside.update(id(x) for x in ast.walk(node))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and _name(node.func) == "bind" and id(node) not in inside and node.args
                and isinstance(node.args[0], ast.Tuple) and len(node.args[0].elts) == 2
                and isinstance(node.args[0].elts[1], ast.Constant) and node.args[0].elts[1].value == 0):
            n += 1
    return n


def env_reads(tree: ast.AST) -> int:
    n = 0
    for node in ast.walk(tree):
        key: ast.AST | None = None
        if isinstance(node, ast.Subscript) and _name(node.value) == "environ" and isinstance(node.ctx, ast.Load):
            key = node.slice
        elif isinstance(node, ast.Call) and node.args and (
                (_name(node.func) == "get" and isinstance(node.func, ast.Attribute) and _name(node.func.value) == "environ")
                or _name(node.func) == "getenv" or _name(node.func).startswith("_env_")):
            key = node.args[0]
        if isinstance(key, ast.Constant) and str(key.value).startswith("COMMLAYER_"):
            n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--list", action="store_true", help="name the files behind each count")
    args = ap.parse_args(argv)
    root = args.root
    rows: dict[str, list[tuple[str, int]]] = {k: [] for k in ("launchers", "free_ports", "env_reads", "over_350",
                                                               "library_over_350", "sys_path_inserts")}
    for f in py_files(root):
        rel = str(f.relative_to(root))
        text = f.read_text()
        tree = ast.parse(text, rel)
        lines = len(text.splitlines())
        lib = rel.split("/")[0] in LIBRARY
        for key, value in (("launchers", launchers(tree)), ("free_ports", free_ports(tree)),
                           ("env_reads", env_reads(tree) if lib and rel != "commlayer/settings.py" else 0),
                           ("over_350", lines if lines > 350 else 0), ("library_over_350", lines if lib and lines > 350 else 0),
                           ("sys_path_inserts", text.count("sys.path.insert") if rel.split("/")[0] in ("tests", "benchmarks") else 0)):
            if value:
                rows[key].append((rel, value))
    for key, found in rows.items():
        total = len(found) if key in ("launchers", "over_350", "library_over_350") else sum(v for _, v in found)
        print(f"{key:<18} {total}")
        if args.list:
            for rel, v in found:
                print(f"    {rel}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
