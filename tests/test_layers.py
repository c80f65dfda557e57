"""The folder tree is the architecture: no module imports a higher floor (docs/contributing.md).

optim (1) < trajectory (2) < adapters (2.5) < distill (3) < cli (4); the package root and
``__main__`` re-export and launch, so they may import anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {"optim": 1.0, "trajectory": 2.0, "adapters": 2.5, "distill": 3.0, "cli": 4.0}


def _module(path: Path) -> tuple[str, bool]:
    """Dotted name of a source file and whether it is a package ``__init__``."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "adapters":
        parts = ["sharp_bilevel", *parts]
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def _floor(module: str) -> float | None:
    parts = module.split(".")
    if parts[0] != "sharp_bilevel" or len(parts) < 2:
        return None
    return FLOORS.get(parts[1])


def _imports(path: Path) -> list[str]:
    """Absolute names of the sharp_bilevel modules ``path`` imports (relative ones resolved)."""
    name, is_package = _module(path)
    package = name.split(".") if is_package else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            else:
                target = node.module or ""
            out.append(target)
            out += [f"{target}.{a.name}" for a in node.names]  # `from . import datm`
    return [m for m in out if m.startswith("sharp_bilevel")]


SOURCES = sorted((ROOT / "sharp_bilevel").rglob("*.py")) + sorted((ROOT / "adapters").rglob("*.py"))


def test_every_module_sits_on_a_floor() -> None:
    loose = [
        _module(p)[0]
        for p in SOURCES
        if _floor(_module(p)[0]) is None
        and _module(p)[0] not in ("sharp_bilevel", "sharp_bilevel.__main__")
    ]
    assert not loose, f"modules outside optim/, trajectory/, adapters/, distill/, cli/: {loose}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_higher_floor(path: Path) -> None:
    name, _ = _module(path)
    own = _floor(name)
    if own is None:
        return  # the package root and __main__
    higher = [m for m in _imports(path) if (_floor(m) or 0) > own]
    assert not higher, f"{name} (floor {own}) imports higher floors: {sorted(set(higher))}"


def test_the_check_catches_an_upward_import(tmp_path: Path) -> None:
    """The resolver sees through relative imports: floor 1 importing floor 3 is found."""
    fake = ROOT / "sharp_bilevel" / "optim" / "_layer_probe.py"
    fake.write_text("from ..distill import pipeline\nfrom .context import ASCENT\n")
    try:
        found = _imports(fake)
    finally:
        fake.unlink()
    assert "sharp_bilevel.distill" in found
    assert _floor("sharp_bilevel.distill.pipeline") == 3.0


def _import_graph(sources: list[Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its source (top level, inside
    functions, under ``if TYPE_CHECKING:``): an imported name maps to the longest prefix that is
    a module (``from .data import ImageDataset`` is an edge to ``...data``)."""
    modules = {_module(p)[0]: p for p in sources}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for target in _imports(path):
            parts = target.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            if parts and ".".join(parts) != name:
                edges.add(".".join(parts))
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_two_modules_import_each_other() -> None:
    """No import circle, counting function-level and TYPE_CHECKING imports (issue 21): each
    shared piece has one home below the modules that use it. Package ``__init__`` files only
    re-export, so edges into a package root are left out (importing a submodule runs its
    package's ``__init__``, which is no dependency of the submodule's code)."""
    graph = _import_graph(SOURCES)
    packages = {_module(p)[0] for p in SOURCES if _module(p)[1]}
    graph = {m: {t for t in ts if t not in packages} for m, ts in graph.items()}
    assert _cycles(graph) == [], f"modules that import each other: {_cycles(graph)}"


def test_the_cycle_check_finds_a_circle_through_a_function_level_import(tmp_path: Path) -> None:
    """Two probe modules, one importing the other at top level and the other back inside a
    function under TYPE_CHECKING-like indirection, are reported as one circle."""
    a, b = (
        ROOT / "sharp_bilevel" / "optim" / "_probe_a.py",
        ROOT / "sharp_bilevel" / "optim" / "_probe_b.py",
    )
    a.write_text("from ._probe_b import f\n")
    b.write_text("def f():\n    from ._probe_a import f as g\n    return g\n")
    try:
        graph = _import_graph([*SOURCES, a, b])
    finally:
        a.unlink()
        b.unlink()
    assert ["sharp_bilevel.optim._probe_a", "sharp_bilevel.optim._probe_b"] in _cycles(graph)
