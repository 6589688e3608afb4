"""The package layout: subpackages that map onto the book, and no import cycles.

The graph counts every import, inside functions too, and `from . import x` as an edge to the
package itself (its `__init__`), as the project's review hook does.
"""

from __future__ import annotations

import ast

from latentmed.paths import ROOT

PKG = ROOT / "lib" / "latentmed"


def import_graph() -> dict[str, set[str]]:
    mods = {}
    for f in PKG.rglob("*.py"):
        name = ".".join(f.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__")
        mods[name] = f
    graph = {m: set() for m in mods}
    for m, f in mods.items():
        base = m if f.name == "__init__.py" else m.rsplit(".", 1)[0]
        for n in ast.walk(ast.parse(f.read_text())):
            targets = []
            if isinstance(n, ast.Import):
                targets = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom):
                stem = n.module or ""
                if n.level:
                    parts = base.split(".")
                    stem = ".".join(parts[:len(parts) - n.level + 1]) + ("." + n.module if n.module else "")
                targets = [stem] + [stem + "." + a.name for a in n.names]
            graph[m] |= {t for t in targets if t in mods and t != m}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(u, path):
        state[u] = 1
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                found.append(path[path.index(v):] + [v])
            elif v not in state:
                visit(v, path + [v])
        state[u] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_planted_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert cycles(g) == [["a", "b", "c", "a"]]


def test_layers_point_one_way():
    """testbed and the engine are independent of each other; the zoo builds on both; nothing
    below the book imports the book or the CLI."""
    g = import_graph()
    def deps(prefix):
        return {t for m, ts in g.items() if m.startswith(prefix) for t in ts}
    assert not any(t.startswith("latentmed.engine") for t in deps("latentmed.testbed"))
    assert not any(t.startswith(("latentmed.testbed", "latentmed.zoo", "latentmed.analysis"))
                   for t in deps("latentmed.engine"))
    assert not any(t in ("latentmed.book", "latentmed.cli") for t in deps("latentmed.zoo") | deps("latentmed.engine"))


def test_subpackages_map_onto_the_book():
    subs = sorted(p.name for p in PKG.iterdir() if (p / "__init__.py").exists())
    assert subs == ["analysis", "engine", "real", "testbed", "zoo"]
    assert max(len(f.read_text().splitlines()) for f in PKG.rglob("*.py")) < 700
