"""The manifest loads from an editable install and from a built wheel; import boundaries hold."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "napari_slide_attention"


def test_root_manifest_is_the_package_manifest():
    root = ROOT / "napari.yaml"
    assert root.is_symlink(), "napari.yaml at the root must point at the package's file"
    assert root.resolve() == (PACKAGE / "napari.yaml").resolve()


def test_npe2_validates_the_installed_plugin():
    result = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", "napari-slide-attention"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


@pytest.mark.slow
def test_built_wheel_carries_and_loads_the_manifest(tmp_path):
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    [wheel] = (tmp_path / "dist").glob("napari_slide_attention-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "napari_slide_attention/napari.yaml" in names
        manifest = zf.read("napari_slide_attention/napari.yaml").decode()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "napari_slide_attention:napari.yaml" in zf.read(entry_points).decode()
    assert manifest == (PACKAGE / "napari.yaml").read_text()
    target = tmp_path / "site"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    # The wheel's copy first on the path: npe2 must find and validate *its* manifest.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from npe2 import PluginManifest;"
        "m = PluginManifest.from_distribution('napari-slide-attention');"
        "import napari_slide_attention as p;"
        "assert p.__file__.startswith(sys.argv[1]), p.__file__;"
        "print(m.name, len(m.contributions.readers), len(m.contributions.sample_data))"
    )
    check = subprocess.run(
        [sys.executable, "-c", code, str(target)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.split() == ["napari-slide-attention", "1", "2"]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


GUI = {"napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt", "vispy"}


def test_only_napari_package_imports_gui_modules():
    for path in PACKAGE.rglob("*.py"):
        if "_napari" in path.relative_to(PACKAGE).parts:
            continue
        assert not _imports(path) & GUI, f"{path.relative_to(ROOT)} imports {_imports(path) & GUI}"


def test_slide_package_never_imports_torch():
    for path in (PACKAGE / "slide").rglob("*.py"):
        assert "torch" not in _imports(path), f"{path.relative_to(ROOT)} imports torch"


def test_importing_the_package_and_reader_loads_no_gui_or_torch():
    code = (
        "import sys, napari_slide_attention, napari_slide_attention.slide.reader,"
        " napari_slide_attention.slide.tissue, napari_slide_attention.slide.stream,"
        " napari_slide_attention.cli, napari_slide_attention.results,"
        " napari_slide_attention.jobs, napari_slide_attention.train.cohort,"
        " napari_slide_attention.models.registry, napari_slide_attention.models.checkpoint,"
        " napari_slide_attention.train.metrics;"
        "bad = {'torch', 'napari', 'qtpy', 'PyQt5', 'PyQt6', 'vispy'} & set(sys.modules);"
        "print(sorted(bad))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_reading_a_checkpoint_header_loads_no_torch(tiny_grid_model):
    """A file picker on the GUI thread asks a checkpoint what it holds: no torch import."""
    code = (
        "import sys;"
        "from napari_slide_attention.models.checkpoint import read_checkpoint;"
        "from napari_slide_attention.models.registry import model_kind;"
        "h = read_checkpoint(sys.argv[1], tensors=False);"
        "print(h.kind, model_kind(h.kind).train_name, len(h.tensors), 'torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tiny_grid_model)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["grid-attention", "grid", "0", "False"]
