"""Smoke tests of the digit benchmarks (benchmarks/megapixel_digits.py, cluttered_digits.py).

Each script's ``main`` runs end to end on a few tiny images for one epoch; the tests
check the exit code, the printed summary and the keys of the JSON report, not the
figures (those need the full runs).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def megapixel():
    return _load("megapixel_digits")


@pytest.fixture(scope="module")
def cluttered():
    return _load("cluttered_digits")


def test_megapixel_digits_smoke(megapixel, tmp_path, capsys) -> None:
    report_path = tmp_path / "megapixel.json"
    argv = [
        "--size", "120", "--train", "8", "--test", "4", "--epochs", "1", "--batch", "4",
        "--width", "8", "--patches", "3", "--patch-px", "20", "--cost-sizes", "150",
        "--cost-batch", "2", "--repeat", "1", "--json", str(report_path),
    ]  # fmt: skip
    assert megapixel.main(argv) == 0
    out = capsys.readouterr().out
    assert "error attention / low-res" in out
    assert "train time attention / full @150" in out

    report = json.loads(report_path.read_text())
    assert report["benchmark"] == "megapixel_digits"
    assert report["settings"]["cost_sizes"] == [120, 150]
    assert set(report["results"]) == set(megapixel.MODELS)
    for name, result in report["results"].items():
        assert result["trained"], name
        assert 0 <= result["test_error"] <= 1
        assert {"parameters", "history", "train_seconds"} <= set(result)
    attention = report["results"]["attention sampling"]
    assert 0 <= attention["digit_mass"] <= 1 and 0 < attention["digit_mass_chance"] < 1
    for size in ("120", "150"):
        for name in megapixel.MODELS:
            cost = report["costs"][size][name]
            assert {"train_ms", "infer_ms", "train_mb", "infer_mb"} <= set(cost)
            assert cost["train_ms"] > 0 and cost["infer_ms"] > 0
    assert {
        "error attention / low-res",
        "error attention / full",
        "train time attention / full @150",
        "train memory attention / full @150",
    } <= set(report["ratios"])


def test_megapixel_patches_are_centred_on_their_cells(megapixel) -> None:
    import torch

    # 30 px patches on a 300 px canvas, 36 px view (x0.12), cells of 2 view px: cell
    # (r, c) covers view rows [2r, 2r + 2), i.e. full-res rows [2r, 2r + 2) x 300 / 36,
    # centred at (2r + 1) x 25 / 3.
    model = megapixel.AttentionSampling(300, 36, 2, 30, 2, 8, 0.0)
    assert model.grid == (18, 18)
    image = torch.zeros(1, 300, 300, dtype=torch.uint8)
    r, c = 5, 12
    cy, cx = round((2 * r + 1) * 25 / 3), round((2 * c + 1) * 25 / 3)
    image[0, cy, cx] = 255
    patch = model.cut_patches(image, torch.tensor([[r * 18 + c]]))[0, 0]  # (30, 30)
    assert patch.shape == (30, 30)
    assert patch[15, 15] == 255 and int(patch.sum()) == 255
    # a cell at the edge gives a patch that reaches past the canvas: zeros there
    corner = model.cut_patches(image + 1, torch.tensor([[0]]))[0, 0]
    assert corner[0, 0] == 0 and corner[-1, -1] == 1


def test_cluttered_digits_smoke(cluttered, tmp_path, capsys) -> None:
    report_path = tmp_path / "cluttered.json"
    argv = [
        "--train", "64", "--test", "32", "--epochs", "1", "--batch", "32",
        "--glimpses", "2", "--feature", "16", "--hidden", "16", "--json", str(report_path),
    ]  # fmt: skip
    code = cluttered.main(argv)
    out = capsys.readouterr().out
    assert "error hard attention / random glimpses" in out
    assert ("PASS" in out) == (code == 0) and ("FAIL" in out) == (code == 1)

    report = json.loads(report_path.read_text())
    assert report["benchmark"] == "cluttered_digits"
    assert set(report["results"]) == set(cluttered.MODELS)
    for result in report["results"].values():
        assert 0 <= result["test_error"] <= 1
        assert len(result["test_error_per_step"]) == 2
        assert {"history", "train_seconds", "parameters"} <= set(result)
    (check,) = report["checks"]
    assert check["target"] == 0.5 and check["pass"] == (code == 0)
    assert report["config"]["glimpses"] == 2 and report["config"]["tile_px"] == 60
