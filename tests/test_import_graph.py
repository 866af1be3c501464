"""Dependencies run one way: no module of healer, trainer, export or cli imports one that imports it back.

The graph is read from the source (every `import` and `from ... import`, inside functions too: a
deferred import is still a dependency), so a cycle fails here before it confuses a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("healer", "trainer", "export")


def modules() -> dict[str, Path]:
    found = {"cli": ROOT / "cli.py"}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                # a module reaching its own package's __init__ is how Python imports it, not a cycle
                if target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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


def test_the_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_our_modules():
    assert cycles(import_graph()) == []


# what each package may not import: healer is the shared core, trainer builds on it, export (and the
# demo, export.demo, which uses all three) sits on top
ABOVE = {"healer": ("trainer", "export"), "trainer": ("export",)}


def test_the_packages_sit_in_one_direction():
    """healer's modules import neither trainer nor export; trainer's modules import nothing from export."""
    graph = import_graph()
    upward = sorted((m, t) for m, targets in graph.items() for t in targets
                    if t.split(".")[0] in ABOVE.get(m.split(".")[0], ()))
    assert upward == []


def test_old_names_of_the_public_api_still_import_and_say_they_are_deprecated():
    import warnings

    import healer
    from healer.model_dir import ModelDir

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from healer.checkpoint import Checkpoint

        assert Checkpoint is ModelDir and healer.Checkpoint is ModelDir
    assert [w.category for w in caught] == [DeprecationWarning] * 2
    assert "healer.model_dir" in str(caught[0].message) and "healer.ModelDir" in str(caught[1].message)
    from healer.fix import repair

    assert healer.repair is repair  # DESIGN's library entry points: healer.diagnose, healer.repair
