#!/usr/bin/env python3
"""Import cycles among commlayer's modules, from an AST walk (no module is imported).

    python scripts/import_cycles.py            # every import, also those inside functions
    python scripts/import_cycles.py --top      # module-level imports only (what fails at import time)
    python scripts/import_cycles.py --root DIR # another checkout

A cycle is a strongly connected component of more than one module. ``import_module("literal")``
counts as an import (the CLI used it to hide one). ``codecs/`` and ``topologies/`` are mapped to
``commlayer.codecs`` / ``commlayer.topologies`` as pyproject installs them. Exit code 1 when there
is a cycle, so CI can run it.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGES = {"commlayer": "commlayer", "codecs": "commlayer.codecs", "topologies": "commlayer.topologies"}


def modules(root: Path) -> dict[str, Path]:
    """Module name -> file, for every .py of the three packages."""
    out: dict[str, Path] = {}
    for folder, pkg in PACKAGES.items():
        for f in sorted((root / folder).rglob("*.py")):
            rel = f.relative_to(root / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = f
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(mod: str, path: Path, known: dict[str, Path], top_only: bool) -> set[str]:
    """The known modules ``mod`` imports (``from pkg import sub`` counts as importing ``pkg.sub`` only)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    base = mod if is_pkg else mod.rpartition(".")[0]
    nodes = tree.body if top_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.rsplit(".", node.level - 1)[0] if node.level > 1 else base
                src = f"{anchor}.{node.module}" if node.module else anchor
            else:
                src = node.module or ""
            # ``from pkg import sub`` imports the module pkg.sub; ``from pkg import name`` imports pkg.
            subs = [f"{src}.{a.name}" for a in node.names]
            names = [n for n in subs if n in known] + ([src] if any(n not in known for n in subs) else [])
        elif (not top_only and isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", ""))
              == "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
            names = [str(node.args[0].value)]
        for n in names:
            target = _resolve(n, known)
            if target and target != mod:
                found.add(target)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return sorted(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--top", action="store_true", help="module-level imports only")
    args = ap.parse_args(argv)
    known = modules(args.root)
    graph = {m: imports(m, p, known, args.top) for m, p in known.items()}
    found = cycles(graph)
    for comp in found:
        print("cycle: " + " <-> ".join(comp))
    print(f"{len(found)} import cycle(s) among {len(known)} modules ({'module-level' if args.top else 'all'} imports)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
