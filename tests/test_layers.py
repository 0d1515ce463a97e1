"""The layers: every import (module level and inside functions) points down, and neither modules nor
folders form a cycle. ``python tests/test_layers.py`` prints each layer with its modules.

A module's layer is that of the longest prefix in ``LAYERS``; a stage's folder (``autoencoder``)
holds several layers of that stage, so some of its modules are listed one by one.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ldm", "autoencoder", "conditioning")

LAYER_NAMES = {
    1: "core",
    2: "data, training infrastructure",
    3: "models",
    4: "diffusion math",
    5: "pipelines",
    6: "evaluation, reports",
    7: "training programs",
    8: "command lines",
}
LAYERS = {
    "ldm.core": 1,
    "ldm.data": 2,
    "ldm.training": 2,
    "ldm.models": 3,
    "autoencoder": 3,
    "conditioning": 3,
    "ldm.diffusion": 4,
    "ldm.pipelines": 5,
    "ldm.eval": 6,
    "autoencoder.evaluate": 6,
    "autoencoder.report": 6,
    "ldm.train": 7,
    "autoencoder.train": 7,
    "autoencoder.finish": 7,
    "ldm.cli": 8,
}
API = "ldm"  # the root package only re-exports the public API (lazily); nothing imports it


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _owner(name: str, known: dict[str, Path]) -> str | None:
    """The module ``name`` lives in: itself, or the package above an imported attribute."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(known: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project's modules it imports, anywhere in the file."""
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        targets: set[str] = set()
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                names = [f"{base}.{alias.name}" for alias in node.names] if base else []
                names = [n if n in known else base for n in names]
            else:
                continue
            for name in names:
                if name.split(".")[0] in PACKAGES:
                    owner = _owner(name, known)
                    if owner and owner != module:
                        targets.add(owner)
        graph[module] = targets
    return graph


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    assert best is not None, f"{module} is in no layer: add its folder to LAYERS in tests/test_layers.py"
    return LAYERS[best]


def folder(module: str, known: dict[str, Path]) -> str:
    """The folder (package) a module sits in: ``ldm.data.cache`` -> ``ldm.data``."""
    return module if known[module].name == "__init__.py" else module.rpartition(".")[0]


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes, or None (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_every_import_points_down():
    known = modules()
    graph = imports(known)
    upward = [
        f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
        for m, targets in graph.items()
        if m != API
        for t in sorted(targets)
        if layer(t) > layer(m)
    ]
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_nothing_imports_the_api_package():
    graph = imports(modules())
    assert not [m for m, targets in graph.items() if API in targets]


def test_no_cycle_between_modules():
    graph = imports(modules())
    found = cycle(graph)
    assert found is None, "modules import each other in a loop: " + " -> ".join(found)


def test_no_cycle_between_folders():
    known = modules()
    graph: dict[str, set[str]] = {}
    for module, targets in imports(known).items():
        if module == API:
            continue
        source = folder(module, known)
        graph.setdefault(source, set()).update(
            folder(t, known) for t in targets if folder(t, known) != source
        )
    found = cycle(graph)
    assert found is None, "folders import each other in a loop: " + " -> ".join(found)


def test_walker_sees_imports_inside_functions(tmp_path):
    """The check is real: an import inside a function body is found."""
    tree = ast.parse("def f():\n    from ldm.cli.common import CliParser\n")
    found = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert found == ["ldm.cli.common"]
    assert cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]


def table() -> str:
    """The README's Layout table: one row per layer, bottom up, with the modules of each folder."""
    known = modules()
    rows = ["| layer | what | modules |", "| --- | --- | --- |"]
    for number, name in LAYER_NAMES.items():
        groups: dict[str, list[str]] = {}
        for module, path in sorted(known.items()):
            if module != API and path.name != "__init__.py" and layer(module) == number:
                package, _, leaf = module.rpartition(".")
                groups.setdefault(package.replace(".", "/") + "/", []).append(leaf)
        cells = "; ".join(f"`{folder}` {', '.join(leaves)}" for folder, leaves in groups.items())
        rows.append(f"| {number} | {name} | {cells} |")
    return "\n".join(rows)


def test_the_readme_layout_table_lists_every_module_in_its_layer():
    readme = (ROOT / "README.md").read_text()
    assert table() in readme, "README.md's Layout table is out of date: paste `python tests/test_layers.py`"


if __name__ == "__main__":
    print(table())  # noqa: T201
