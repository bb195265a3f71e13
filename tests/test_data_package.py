"""The layout of ``shared.data`` as a package: one registry, one synthetic spec, no module using
another's private names, a split made of steps that fit on a screen, one cache reset for all."""

from __future__ import annotations

import ast
import functools
import importlib
import pkgutil
import sys
from pathlib import Path

import pytest

from storefed.shared import data as D
from storefed.shared.data import registry, split
from storefed.shared.errors import DataError

PKG_DIR = Path(D.__file__).parent
MODULES = sorted(m.name for m in pkgutil.iter_modules([str(PKG_DIR)]))


def test_every_reader_module_is_registered_once_and_datasets_is_the_registry():
    exported = {}
    for name in MODULES:
        reader = getattr(importlib.import_module(f"storefed.shared.data.{name}"), "READER", None)
        if reader is not None:
            exported[reader.name] = reader
    assert exported == registry.READERS
    assert D.DATASETS == tuple(registry.READERS) == (
        "synthetic", "table", "xmarket", "xmrec", "movielens", "amazon-pairs"
    )
    with pytest.raises(DataError, match="unknown dataset 'nope'; known datasets: synthetic"):
        D.available_markets("nope", None)


def test_no_module_of_the_package_uses_another_modules_private_names():
    wrong = []
    for name in MODULES + ["__init__"]:
        tree = ast.parse((PKG_DIR / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("shared"):
                wrong += [f"{name}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_")]
            if isinstance(node, (ast.Import, ast.ImportFrom)) and node not in tree.body:
                wrong.append(f"{name}: import inside a function (line {node.lineno})")
    assert not wrong, wrong


def test_synthetic_sizes_come_from_the_one_spec():
    spec = D.SYNTHETIC_SPEC
    assert D.available_markets("synthetic", None) == [f"m{m}" for m in range(spec.n_markets)]
    assert D.load_catalog("synthetic", None).n_items == spec.n_items
    assert len(D.load_catalog("synthetic", None).categories) == spec.n_categories
    df = D.generate_synthetic()
    assert len(df) == spec.n_markets * spec.users_per_market * spec.interactions_per_user
    smaller = D.SyntheticSpec(n_markets=2, n_items=50, users_per_market=5)
    df2 = D.generate_synthetic(
        smaller.n_markets, smaller.n_categories, smaller.n_items, smaller.users_per_market,
        smaller.interactions_per_user,
    )
    assert sorted(df2["market"].unique()) == ["m0", "m1"] and df2["item"].nunique() <= 50
    with pytest.raises(DataError, match="exceeds n_items"):
        D.generate_synthetic(n_items=5, interactions_per_user=6)


def _lru_caches() -> list[functools._lru_cache_wrapper]:
    found = []
    for name, mod in list(sys.modules.items()):
        if name == "storefed.shared.data" or name.startswith("storefed.shared.data."):
            found += [f for f in vars(mod).values() if callable(getattr(f, "cache_clear", None))]
    return found


def test_clear_caches_given_the_package_empties_every_cache_of_its_modules(tmp_path):
    # what shared.node.clear_caches passes: the package object itself
    xm = tmp_path / "xm"
    xm.mkdir()
    (xm / "aa_5core.txt").write_text(
        "userId itemId rate date\n"
        + "".join(f"u{u} i{u + i} 5.0 2020-01-0{i + 1}\n" for u in range(4) for i in range(4))
    )
    D.load_market("xmarket", xm, "aa")
    D.load_market("synthetic", None, "m0")
    assert sum(f.cache_info().currsize for f in _lru_caches()) >= 4  # listing, file, catalog, split
    D.clear_caches(D)
    assert [f for f in _lru_caches() if f.cache_info().currsize] == []


def _code_lines(fn: ast.FunctionDef) -> int:
    body = fn.body[1:] if isinstance(fn.body[0], ast.Expr) else fn.body  # without docstring
    return body[-1].end_lineno - body[0].lineno + 1  # type: ignore[operator]


def test_split_market_is_a_chain_of_steps_that_each_fit_on_a_screen():
    tree = ast.parse(Path(split.__file__).read_text())
    sizes = {n.name: _code_lines(n) for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert {"_market_of", "_rows", "_item_indices", "_user_rows", "_negatives"} <= set(sizes)
    assert max(sizes.values()) <= 50, sizes
