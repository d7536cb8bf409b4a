"""The module graph of mergex-core, from its source: which file uses which (``use crate::…``,
``use super::…`` and inline ``crate::…`` paths), the cycles among files, and the uses that go
against the layering ``error, job → format → numeric → kernels → methods → engine``.

Usage: python scripts/module_graph.py [--edges]  (exit 1 when there is a cycle or a
layering violation; the test suite runs it).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "rust" / "mergex-core" / "src"
# Each top-level module's layer: a module may use its own layer and those below.
LAYERS = {"error": 0, "job": 0, "format": 1, "numeric": 2, "kernels": 3, "methods": 4, "engine": 5}
_USE = re.compile(r"\buse\s+((?:crate|super|self)(?:::\w+)*)(?:::\{([^;]*)\})?")
_INLINE = re.compile(r"\b(crate|super)((?:::\w+)+)")


def modules() -> dict[tuple[str, ...], Path]:
    out = {}
    for f in SRC.rglob("*.rs"):
        parts = f.relative_to(SRC).with_suffix("").parts
        if parts[-1] in ("mod", "lib"):
            parts = parts[:-1]
        out[parts] = f
    return out


def strip(text: str) -> str:
    """The code without comments, string literals and #[cfg(test)] modules."""
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    cut = re.search(r"#\[cfg\(test\)\]\s*mod tests", text)
    return text[: cut.start()] if cut else text


def resolve(path: list[str], here: tuple[str, ...], mods: dict) -> tuple[str, ...] | None:
    """The deepest file module that ``path`` (from ``here``) names."""
    if path[0] == "crate":
        full: list[str] = []
    elif path[0] == "super":
        full = list(here[:-1])
        while path[1:2] == ["super"]:
            full = full[:-1]
            path = path[1:]
    else:  # self
        full = list(here)
    full += path[1:]
    while full and tuple(full) not in mods:
        full.pop()
    return tuple(full) if full else None


def graph() -> dict[tuple[str, ...], set[tuple[str, ...]]]:
    mods = modules()
    edges: dict[tuple[str, ...], set[tuple[str, ...]]] = {m: set() for m in mods}
    for m, f in mods.items():
        here = m
        text = strip(f.read_text(encoding="utf-8"))
        paths = []
        for head, group in _USE.findall(text):
            base = head.split("::")
            items = [g.strip().split("::") for g in group.split(",") if g.strip()] if group else [[]]
            paths += [base + [p for p in it if p not in ("self", "*")] for it in items]
        paths += [[root, *p.strip(":").split("::")] for root, p in _INLINE.findall(text)]
        # A module's own children, named without a prefix (`linear::LINEAR` in methods/mod.rs).
        for child in (c for c in mods if len(c) == len(m) + 1 and c[: len(m)] == m):
            if re.search(rf"(?<![\w:]){child[-1]}::", text):
                paths.append(["self", child[-1]])
        for p in paths:
            target = resolve(p, here, mods)
            if target is not None and target != m and target != ():
                edges[m].add(target)
    return edges


def cycles(edges) -> list[list[tuple[str, ...]]]:
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
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

    sys.setrecursionlimit(10000)
    for v in edges:
        if v not in index:
            visit(v)
    return out


def violations(edges) -> list[str]:
    bad = []
    for a, targets in edges.items():
        for b in targets:
            if not a or not b:
                continue
            la, lb = LAYERS.get(a[0], 0), LAYERS.get(b[0], 0)
            if lb > la:
                bad.append(f"{'::'.join(a)} uses {'::'.join(b)}")
    return sorted(bad)


def main() -> int:
    edges = graph()
    if "--edges" in sys.argv:
        for a in sorted(edges):
            print("::".join(a), "->", ", ".join(sorted("::".join(b) for b in edges[a])))
    found = cycles(edges)
    for c in found:
        print("cycle:", " <-> ".join("::".join(m) for m in c))
    bad = violations(edges)
    for v in bad:
        print("against the layering:", v)
    if not found and not bad:
        print(f"{len(edges)} modules, no cycles, layering respected")
    return 1 if found or bad else 0


if __name__ == "__main__":
    sys.exit(main())
