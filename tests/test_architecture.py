"""The house, checked from its imports (ARCHITECTURE.md draws it).

Every ``import`` of every project module counts, at module level or inside a function, and so
does every module the CLI loads by name (``simulations.cli.COMMANDS``): a cycle hidden behind a
function-level import is still a cycle. Layers point down only: ``simulations.cli`` (the
command registry) names every command; ``simulations.experiments`` (the lab) may use everything
else; the product commands in ``simulations`` use ``server``, ``client`` and
``shared``; ``server`` and ``client`` use ``shared`` and never each other; ``shared`` uses only
itself. The folders install as the ``storefed.*`` package (module names here carry it), and
nothing else.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("shared", "server", "client", "simulations")
NAMESPACE = "storefed"


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([NAMESPACE, *parts])] = path
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
    if module == "storefed.simulations.cli":  # the command registry loads its modules by name
        from storefed.simulations.cli import COMMANDS

        found |= {c.module for c in COMMANDS.values()}
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def _package(module: str) -> str:
    """``storefed.server.secagg`` -> ``server``."""
    return module.split(".")[1]


def _layer(module: str) -> int:
    if module == "storefed.simulations.cli":  # the dispatcher above both the product and the lab
        return 4
    if module.startswith("storefed.simulations.experiments"):
        return 3
    if _package(module) == "simulations":
        return 2
    if _package(module) in ("server", "client"):
        return 1
    return 0


def test_the_graph_is_the_projects():
    """Every import of the project resolves to a project module (a walker that resolved none
    would pass every check below)."""
    assert all(m.startswith(NAMESPACE + ".") for m in MODULES)
    assert sum(len(d) for d in GRAPH.values()) > 200
    assert "storefed.shared.config" in GRAPH["storefed.server.rounds"]


def test_nothing_imports_the_folders_by_their_bare_names():
    """In the checkout ``import shared`` still works (the folder is on ``sys.path``), but an
    installed storefed has no such module: every import, in the project and its tests, goes
    through ``storefed.``; so do modules named in strings (``importlib``, ``python -m``)."""
    bare = ("shared", "server", "client", "simulations")
    wrong = []
    files = [*MODULES.values(), *sorted((ROOT / "tests").glob("*.py"))]
    for path in files:
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom)
                     and not node.level else [])
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                names = [m for m in re.findall(r"(?:\bfrom|\bimport|-m)\s+(\w+\.[\w.]+)",
                                               node.value)
                         if f"{NAMESPACE}.{m}" in MODULES]
                whole = re.fullmatch(r"(\w+\.[\w.]+)(:\w+)?", node.value)
                if whole and f"{NAMESPACE}.{whole[1]}" in MODULES:
                    names.append(whole[1])
            wrong += [f"{path.relative_to(ROOT)}: {n}" for n in names
                      if n.split(".")[0] in bare]
    assert not wrong, "bare imports (use storefed.*): " + ", ".join(sorted(set(wrong)))


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
                   or (_package(m) in ("server", "client")
                       and _package(n) in ("server", "client")
                       and _package(n) != _package(m)))
    assert not wrong, "imports running back up: " + ", ".join(wrong)


def test_product_never_imports_the_lab():
    lab = {m for m in MODULES if m.startswith("storefed.simulations.experiments")}
    product = [m for m in MODULES if m not in lab and m != "storefed.simulations.cli"]
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
    src = "def f():\n    from storefed.client.client_app import app  # noqa\n"
    path = tmp_path / "probe.py"
    path.write_text(src)
    monkeypatch.setitem(MODULES, "storefed.shared.probe", path)
    assert "storefed.client.client_app" in _imports("storefed.shared.probe")


@pytest.mark.slow
def test_installed_modules_live_under_storefed_only(tmp_path):
    """``pip install -e .`` into a fresh virtualenv: from outside the checkout, the design
    card's folder names (generic names anything else could claim) do not import, and
    ``storefed.*`` does, from this checkout."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    res = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT)],
                         capture_output=True, text=True, env=clean, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    probe = (
        "import importlib, json\n"
        "out = {}\n"
        f"for name in {list(PACKAGES)!r}:\n"
        "    try:\n"
        "        importlib.import_module(name); out[name] = 'imported'\n"
        "    except ImportError:\n"
        "        out[name] = 'missing'\n"
        f"for name in {[f'{NAMESPACE}.{p}' for p in PACKAGES]!r}:\n"
        "    out[name] = importlib.import_module(name).__file__\n"
        "print(json.dumps(out))\n")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    res = subprocess.run([str(py), "-c", probe], cwd=outside, capture_output=True, text=True,
                         env=clean, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    import json  # noqa: PLC0415

    got = json.loads(res.stdout)
    assert all(got[p] == "missing" for p in PACKAGES), got
    for p in PACKAGES:
        assert Path(got[f"{NAMESPACE}.{p}"]).resolve() == (ROOT / p / "__init__.py").resolve()
