"""The layer contract (DESIGN.md): imports never climb, pair by pair.

``slide/`` (numpy/dask) <- ``models/`` (torch) <- ``inference/`` <- ``train/`` <-
``cli/``, ``_napari/``; ``labels/`` never imports train; ``jobs.py`` and ``results.py``
import nothing of ours. Every import statement counts, those inside functions too, so a
lazy import cannot hide a climb. One test per forbidden pair names each offending line.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "napari_slide_attention"
NAME = "napari_slide_attention"

# What each layer may import of ours (besides itself).
ALLOWED = {
    "shared": set(),  # jobs.py, results.py, files.py, __init__.py
    "slide": {"shared"},
    "models": {"slide", "shared"},
    "inference": {"models", "slide", "shared"},
    "labels": {"slide", "shared"},
    "train": {"inference", "models", "slide", "labels", "shared"},
    "cli": {"train", "inference", "models", "slide", "labels", "shared", "_napari"},
    "_napari": {"train", "inference", "models", "slide", "labels", "shared"},
}
LAYERS = sorted(ALLOWED)
SHARED = {"jobs", "results", "files", "__init__", "__main__"}
# Third-party packages a layer must not import.
FORBIDDEN_PACKAGES = {
    "torch": {"slide", "labels", "shared"},
    "napari": set(LAYERS) - {"_napari"},
    "qtpy": set(LAYERS) - {"_napari"},
    "magicgui": set(LAYERS) - {"_napari"},
    "vispy": set(LAYERS) - {"_napari"},
}


def layer_of(parts: tuple[str, ...]) -> str:
    """The layer of a module given as its parts below the package."""
    top = parts[0].removesuffix(".py") if parts else "__init__"
    return "shared" if top in SHARED else top


def ours(node: ast.ImportFrom, package: list[str]) -> list[str] | None:
    """The module of ours a ``from`` import names, as parts below the package (None for a
    third-party module)."""
    if node.level:
        base = package[: len(package) - (node.level - 1)]
        return [*base, *(node.module.split(".") if node.module else [])]
    if node.module and node.module.split(".")[0] == NAME:
        return node.module.split(".")[1:]
    return None


def modules():
    """(parts below the package, its layer, its package parts, parsed tree) per module."""
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).parts
        yield rel, layer_of(rel), list(rel[:-1]), ast.parse(path.read_text())


@functools.cache
def imports() -> list[tuple[str, str, str, int, str]]:
    """(importer layer, importee layer or package, file, line, module) for every import."""
    rows = []
    for rel, me, package, tree in modules():
        for node in ast.walk(tree):
            targets: list[tuple[str, ...] | str] = []
            if isinstance(node, ast.ImportFrom):
                module = ours(node, package)
                if module is None:
                    if node.module:
                        targets.append(node.module.split(".")[0])
                elif not node.module:  # from . import a, b
                    targets += [tuple([*module, a.name]) for a in node.names]
                else:
                    targets.append(tuple(module))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    head, *rest = alias.name.split(".")
                    targets.append(tuple(rest) if head == NAME else head)
            for target in targets:
                where = "/".join(rel)
                if isinstance(target, str):
                    rows.append((me, f"package:{target}", where, node.lineno, target))
                else:
                    rows.append((me, layer_of(target), where, node.lineno, ".".join(target)))
    return rows


FORBIDDEN_PAIRS = [(a, b) for a in LAYERS for b in LAYERS if a != b and b not in ALLOWED[a]]


def test_every_module_is_in_a_layer():
    layers = {row[0] for row in imports()}
    assert layers <= set(ALLOWED), f"modules outside the layers: {layers - set(ALLOWED)}"
    assert {"slide", "models", "inference", "train", "cli", "_napari", "labels"} <= layers


@pytest.mark.parametrize(("importer", "importee"), FORBIDDEN_PAIRS)
def test_no_import_climbs_a_layer(importer, importee):
    bad = [
        f"{where}:{line} imports {module}"
        for me, other, where, line, module in imports()
        if me == importer and other == importee
    ]
    assert not bad, f"{importer} must not import {importee}:\n" + "\n".join(bad)


@pytest.mark.parametrize("package", sorted(FORBIDDEN_PACKAGES))
def test_third_party_packages_stay_in_their_layers(package):
    bad = [
        f"{where}:{line} imports {module}"
        for me, other, where, line, module in imports()
        if other == f"package:{package}" and me in FORBIDDEN_PACKAGES[package]
    ]
    assert not bad, f"{package} imported outside its layers:\n" + "\n".join(bad)


def test_no_private_name_crosses_a_layer():
    """A layer uses another only through its public names."""
    bad = []
    for rel, me, package, tree in modules():
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            target = ours(node, package)
            if target is None:
                continue
            if layer_of(tuple(target)) == me:
                continue
            private = [
                a.name
                for a in node.names
                if a.name.startswith("_")
                and not (a.name.startswith("__") and a.name.endswith("__"))
            ]
            if private or any(p.startswith("_") and p != "__init__" for p in target[1:]):
                bad.append(f"{'/'.join(rel)}:{node.lineno} imports {private or target}")
    assert not bad, "private names used across layers:\n" + "\n".join(bad)


def test_the_check_sees_a_climb(tmp_path, monkeypatch):
    """The checker itself: a module of slide/ importing inference is found."""
    fake = tmp_path / NAME
    (fake / "slide").mkdir(parents=True)
    (fake / "slide" / "bad.py").write_text(
        "def f():\n    from ..inference import predict\n    import torch\n"
    )
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    imports.cache_clear()
    try:
        rows = imports()
    finally:
        imports.cache_clear()
    assert ("slide", "inference", "slide/bad.py", 2, "inference") in rows
    assert ("slide", "package:torch", "slide/bad.py", 3, "torch") in rows
