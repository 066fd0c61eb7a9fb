"""The bundle's code has no import cycle: every ``import`` of ``scripts`` code, at module level or inside a function,
is an edge of the graph, and the graph must be acyclic (so no function-local import exists to break a cycle), and
``scripts.plans`` (data and validation only) imports nothing from networks, transforms or post-processing."""

from __future__ import annotations

import ast
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "bundle" / "scripts"


def module_name(path: Path, root: Path = SCRIPTS) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = SCRIPTS) -> dict[str, set[str]]:
    """``{module: the scripts modules it imports}``, from every import statement anywhere in its source."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, one level up per extra dot
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from package import module` imports the module; `from module import name` the module
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in files and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_finds_a_cycle(tmp_path):
    package = tmp_path / "scripts"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from scripts.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from .. import a\n")  # function-local and relative
    assert find_cycle(import_graph(package)) == ["scripts.a", "scripts.sub.b", "scripts.a"]


def test_plans_is_data_only():
    imported = import_graph()["scripts.plans"]
    code = ("networks", "transforms", "inference", "scores", "anomalies")
    forbidden = {m for m in imported if m.split(".")[1] in code}
    assert not forbidden, f"scripts.plans imports {sorted(forbidden)}"
