"""The layers of DESIGN.md, read from the code's own imports (every import, lazy ones included).

From the bottom up: 1. ``buffers`` and ``runtime.core``; 2. ``policies``; 3. ``actors``;
4. ``launchers``; 5. the ``runtime`` wiring. A module may import its own layer and those below,
never one above; and no set of modules imports each other in a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("buffers", "runtime", "policies", "actors", "launchers")


def layer(module: str) -> int:
    if module == "runtime.core" or module.startswith(("runtime.core.", "buffers")):
        return 1
    top = module.split(".")[0]
    return {"policies": 2, "actors": 3, "launchers": 4, "runtime": 5}[top]


def modules(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    out = {}
    for pkg in packages:
        for path in (root / pkg).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``path`` names, each resolved to the longest known module name.

    ``from a.b import c`` is an edge to the module ``a.b.c`` when there is one, else to ``a.b``
    (c is a name its ``__init__`` defines). The package ``__init__``s Python runs on the way to a
    module (``import a.b.c`` runs ``a`` and ``a.b``) are not edges: only what the code names is,
    so a submodule that takes a name from its own package's ``__init__`` is seen, and the circle it
    makes when that ``__init__`` imports the submodule is caught.
    """
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.update(f"{node.module}.{a.name}" for a in node.names)
    out = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            out.add(name)
    return out


def graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    known = modules(root, packages)
    return {m: {i for i in imports(p, known) if i != m} for m, p in known.items()}


def upward(g: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} (layer {layer(m)}) imports {i} (layer {layer(i)})"
                  for m, deps in g.items() for i in deps if layer(i) > layer(m))


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


# Known violations being removed (issue 17); a fixed one must leave this list, a new one fails.
KNOWN_UPWARD: set[str] = set()
KNOWN_CIRCLES: list[list[str]] = []


def test_no_import_runs_up_a_layer():
    assert set(upward(graph())) == KNOWN_UPWARD


def test_no_import_circles():
    assert circles(graph()) == KNOWN_CIRCLES


@pytest.mark.parametrize("edge, found", [
    ({"buffers.buffer": {"runtime.scheduler"}, "runtime.scheduler": set()}, True),
    ({"policies.loss": {"actors.learner"}, "actors.learner": set()}, True),
    ({"actors.learner": {"policies.loss", "runtime.core.ledger"}}, False),
])
def test_the_checks_would_catch_an_upward_import_and_a_circle(edge, found):
    assert bool(upward(edge)) is found
    assert circles({"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}, "a.w": {"a.x"}}) == [["a.x", "a.y", "a.z"]]


def test_a_name_taken_from_a_packages_init_is_an_edge(tmp_path):
    """The recipes' circle (issue 17): ``pkg/__init__`` imports ``pkg.sub``, which takes a name
    from ``pkg``; both edges are seen, a plain submodule import is not mistaken for one."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("from pkg.sub import make\n\nclass Recipe: ...\n")
    (tmp_path / "pkg" / "sub.py").write_text("from pkg import Recipe\n\nmake = Recipe\n")
    (tmp_path / "pkg" / "other.py").write_text("from pkg import sub\nimport pkg.sub\n")
    g = graph(tmp_path, ("pkg",))
    assert g == {"pkg": {"pkg.sub"}, "pkg.sub": {"pkg"}, "pkg.other": {"pkg.sub"}}
    assert circles(g) == [["pkg", "pkg.sub"]]
