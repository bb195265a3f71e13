"""The house, checked from its imports (ARCHITECTURE.md draws it).

Every ``import`` of every project module counts, at module level or inside a function, and so
does every module the CLI loads by name (``simulations.cli.COMMANDS``): a cycle hidden behind a
function-level import is still a cycle. Layers point down only: ``simulations.cli`` (the
command registry) names every command; ``simulations.experiments`` (the lab) may use everything
else; the product commands in ``simulations`` use ``server``, ``client`` and
``shared``; ``server`` and ``client`` use ``shared`` and never each other; ``shared`` uses only
itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("shared", "server", "client", "simulations")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module an imported name belongs to (``a.b.c`` -> ``a.b`` if ``a.b.c`` is an
    attribute), or None for anything outside the project."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text())
    found: set[str] = set()
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]
        for n in names:
            target = _resolve(n)
            if target is not None and target != module:
                found.add(target)
    if module == "simulations.cli":  # the command registry loads its modules by name
        from simulations.cli import COMMANDS

        found |= {c.module for c in COMMANDS.values()}
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def _layer(module: str) -> int:
    if module == "simulations.cli":  # the dispatcher above both the product and the lab
        return 4
    if module.startswith("simulations.experiments"):
        return 3
    if module.startswith("simulations"):
        return 2
    if module.startswith(("server", "client")):
        return 1
    return 0


def test_no_import_cycle():
    """Depth-first search over the whole graph; reports one cycle with its path."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                return [*stack[stack.index(n):], n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(GRAPH):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_down():
    wrong = sorted(f"{m} -> {n}" for m, deps in GRAPH.items() for n in deps
                   if _layer(n) > _layer(m)
                   or (m.split(".")[0] in ("server", "client")
                       and n.split(".")[0] in ("server", "client")
                       and n.split(".")[0] != m.split(".")[0]))
    assert not wrong, "imports running back up: " + ", ".join(wrong)


def test_product_never_imports_the_lab():
    lab = {m for m in MODULES if m.startswith("simulations.experiments")}
    product = [m for m in MODULES if m not in lab and m != "simulations.cli"]
    wrong = sorted(f"{m} -> {n}" for m in product for n in GRAPH[m] if n in lab)
    assert lab, "no lab package found: the check would pass vacuously"
    assert not wrong, "product modules importing the lab: " + ", ".join(wrong)


def test_no_module_reaches_into_another_modules_private_names():
    wrong = []
    for m, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and _resolve(node.module):
                wrong += [f"{m}: from {node.module} import {a.name}" for a in node.names
                          if a.name.startswith("_") and a.name != "__version__"]
    assert not wrong, "private names used across modules: " + "; ".join(wrong)


@pytest.mark.parametrize("app,limit", [("server/server_app.py", 100),
                                       ("client/client_app.py", 100)])
def test_flower_apps_are_thin(app, limit):
    lines = len((ROOT / app).read_text().splitlines())
    assert lines <= limit, f"{app} has {lines} lines (at most {limit})"


def test_the_check_sees_a_cycle_hidden_in_a_function(tmp_path, monkeypatch):
    """The walker must count function-level imports, or it could pass a hidden cycle."""
    src = "def f():\n    from client.client_app import app  # noqa\n"
    path = tmp_path / "probe.py"
    path.write_text(src)
    monkeypatch.setitem(MODULES, "shared.probe", path)
    assert "client.client_app" in _imports("shared.probe")
