#!/usr/bin/env python3
"""Prints which top-level modules of each library crate use which, and fails on a cycle.

A module `a` uses `b` when a file under `a` names `crate::b` (or, in a file directly under
src/, `super::b`). Usage: scripts/module-deps.py [SRC_DIR ...]
(default: every crates/*/src and src)."""
import pathlib
import re
import sys

roots = [pathlib.Path(p) for p in sys.argv[1:]] or sorted(pathlib.Path("crates").glob("*/src"))
roots += [] if sys.argv[1:] else [pathlib.Path("src")]
failed = False
for root in roots:
    if not root.is_dir():
        continue
    mods = {}
    for f in root.rglob("*.rs"):
        rel = f.relative_to(root)
        top = rel.parts[0].removesuffix(".rs")
        if top in ("lib", "main"):
            continue
        text = re.sub(r"//[^\n]*", "", f.read_text())
        used = set(re.findall(r"\bcrate::([a-z_0-9]+)", text))
        if len(rel.parts) == 1:
            # In a file directly under src/, `super::x` is the sibling module x.
            used |= set(re.findall(r"\bsuper::([a-z_0-9]+)", text))
        mods.setdefault(top, set()).update(u for u in used if u != top)
    known = set(mods)
    graph = {m: sorted(u & known) for m, u in mods.items()}
    print(f"{root}:")
    for m in sorted(graph):
        print(f"  {m:12} -> {', '.join(graph[m]) or '-'}")
    # Depth-first search for a cycle.
    state = {}

    def visit(m, path):
        global failed
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                print("  CYCLE: " + " -> ".join(path[path.index(n):] + [n]))
                failed = True
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
sys.exit(1 if failed else 0)
