"""Synthetic slides: determinism, pyramid layout, ground truth and bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage

import napari_slide_attention
from napari_slide_attention.slide.synthetic import (
    SYNTHETIC_CLASSES,
    SyntheticSlide,
    read_sidecar,
    sample_slide,
    sidecar_path,
    tissue_mask_truth,
    write_synthetic_slide,
)

# Small enough to write quickly, large enough that 64 px lesions stay under 1 % of tissue.
SIZE = (4096, 3072)
LESION = 64


def _level(path: Path, level: int) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        return tif.series[0].levels[level].asarray()


def _saturation(rgb: np.ndarray) -> np.ndarray:
    return rgb.max(axis=-1).astype(np.int16) - rgb.min(axis=-1)


@pytest.fixture(scope="module")
def by_class(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SyntheticSlide]:
    """One slide per lesion class (plus a normal one), written once for the module.

    Two levels only: the tests look at levels 0 and 1, and this keeps the module fast.
    """
    root = tmp_path_factory.mktemp("synthetic")
    return {
        name: write_synthetic_slide(
            root / f"{name}.tif", SIZE, name, seed=10 + k, lesion_size=LESION, levels=2
        )
        for k, name in enumerate(SYNTHETIC_CLASSES)
    }


def test_same_seed_gives_identical_files_and_other_seeds_differ(tmp_path: Path) -> None:
    kwargs = {"size": (2048, 1536), "label": "high-grade", "lesion_size": 48}
    a = write_synthetic_slide(tmp_path / "a" / "s.tif", seed=7, **kwargs)
    b = write_synthetic_slide(tmp_path / "b" / "s.tif", seed=7, **kwargs)
    c = write_synthetic_slide(tmp_path / "c" / "s.tif", seed=8, **kwargs)

    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.sidecar.read_bytes() == b.sidecar.read_bytes()
    assert a.path.read_bytes() != c.path.read_bytes()
    assert (a.pieces, a.lesion_boxes) != (c.pieces, c.lesion_boxes)
    # No leftovers from the write-then-rename.
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["s.tif", "s.tif.json"]


def test_pyramid_is_tiled_jpeg_with_halving_levels_and_mpp(tmp_path: Path) -> None:
    slide = write_synthetic_slide(
        tmp_path / "s.tif", (2500, 1300), "low-grade", seed=3, mpp=0.25, lesion_size=32
    )
    with tifffile.TiffFile(slide.path) as tif:
        levels = tif.series[0].levels
        shapes = [lvl.shape for lvl in levels]
        assert shapes == [(1300, 2500, 3), (650, 1250, 3), (325, 625, 3)]
        assert slide.levels == 3
        assert len(tif.pages) == 1  # reduced levels live in SubIFDs, not as extra pages
        for k, lvl in enumerate(levels):
            page = lvl.keyframe
            assert page.is_tiled
            assert (page.tilelength, page.tilewidth) == (256, 256)
            assert page.compression == 7  # JPEG
            assert page.dtype == np.uint8
            num, den = page.tags["XResolution"].value
            assert page.tags["ResolutionUnit"].value == 3  # centimetre
            assert 1e4 / (num / den) == pytest.approx(0.25 * 2**k)
            if k:
                assert page.subfiletype == 1  # reduced-resolution image
        description = json.loads(tif.pages[0].description)
        assert description["mpp"] == [0.25, 0.25]
        assert description["label"] == "low-grade"
        assert description["magnification"] == 20.0
        assert levels[1].asarray().shape == (650, 1250, 3)

    fixed = write_synthetic_slide(tmp_path / "t.tif", (2048, 2048), "normal", levels=2)
    with tifffile.TiffFile(fixed.path) as tif:
        assert [lvl.shape[:2] for lvl in tif.series[0].levels] == [(2048, 2048), (1024, 1024)]


def test_lesions_lie_inside_tissue_and_image(by_class: dict[str, SyntheticSlide]) -> None:
    for name, slide in by_class.items():
        info = read_sidecar(slide.path)
        if name == "normal":
            continue
        assert slide.lesion_boxes
        assert set(slide.lesion_classes) == {name}
        width, height = slide.size
        for x, y, w, h in slide.lesion_boxes:
            assert x >= 0 and y >= 0 and x + w <= width and y + h <= height
            assert abs(w - LESION) <= 0.2 * LESION and abs(h - LESION) <= 0.2 * LESION
            assert any(
                px <= x and py <= y and x + w <= px + pw and y + h <= py + ph
                for px, py, pw, ph in slide.pieces
            )
            assert tissue_mask_truth(info, 1, region=(x, y, w, h)).all()
        assert 0 < info["lesion_fraction"] < 0.01


def test_default_sample_is_a_needle_in_a_haystack(tmp_path: Path) -> None:
    path = sample_slide(tmp_path)
    info = read_sidecar(path)
    assert info["label"] == "carcinoma" and info["size"] == [8192, 6144]
    assert info["lesion_fraction"] < 0.005
    assert 0.05 < info["tissue_fraction"] < 0.8
    assert len(info["lesions"]) >= 2
    # A valid sample is reused, not rewritten.
    mtime = path.stat().st_mtime_ns
    assert sample_slide(tmp_path) == path
    assert path.stat().st_mtime_ns == mtime


def test_sample_slide_uses_the_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from napari_slide_attention.slide.synthetic import writer

    calls = []
    monkeypatch.setattr(writer, "write_synthetic_slide", lambda *a, **k: calls.append(a))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = writer.sample_slide()
    assert path.parent == tmp_path / "napari-slide-attention"
    assert calls and calls[0][0] == path


def test_lesion_colour_encodes_the_class(by_class: dict[str, SyntheticSlide]) -> None:
    means: dict[str, list[np.ndarray]] = {}
    for name, slide in by_class.items():
        rgb = _level(slide.path, 0)
        info = read_sidecar(slide.path)
        if name == "normal":
            # Benign tissue, away from the rim where JPEG blends it with the glass.
            tissue = ndimage.binary_erosion(tissue_mask_truth(info, 1), iterations=8)
            means[name] = [rgb[tissue].mean(axis=0)]
            continue
        for x, y, w, h in slide.lesion_boxes:
            yy, xx = np.mgrid[0:h, 0:w]
            core = ((xx + 0.5 - w / 2) / (w / 2)) ** 2 + ((yy + 0.5 - h / 2) / (h / 2)) ** 2 < 0.36
            means.setdefault(name, []).append(rgb[y : y + h, x : x + w][core].mean(axis=0))

    per_class = {name: np.mean(v, axis=0) for name, v in means.items()}
    # Each class is separable by colour alone, and darker with risk.
    for i, a in enumerate(SYNTHETIC_CLASSES):
        for b in SYNTHETIC_CLASSES[i + 1 :]:
            assert np.linalg.norm(per_class[a] - per_class[b]) > 15, (a, b, per_class)
        if i:
            previous = SYNTHETIC_CLASSES[i - 1]
            assert per_class[a].mean() < per_class[previous].mean() - 5, per_class
    # Lesions of one class look alike: each lesion's mean colour is nearest its own class.
    names = list(per_class)
    centroids = np.asarray([per_class[n] for n in names])
    for name, values in means.items():
        for value in values:
            nearest = names[int(np.argmin(np.linalg.norm(centroids - value, axis=1)))]
            assert nearest == name, (name, value, per_class)


def test_background_is_near_white_and_grey(by_class: dict[str, SyntheticSlide]) -> None:
    slide = by_class["carcinoma"]
    rgb = _level(slide.path, 1)
    truth = tissue_mask_truth(slide, 2)
    glass = ~ndimage.binary_dilation(truth, iterations=4)
    assert glass.mean() > 0.2
    assert 232 <= rgb[glass].mean() <= 248
    assert rgb[glass].min() >= 220
    saturation = _saturation(rgb)
    assert saturation[glass].mean() < 4
    # JPEG stores chroma per 16 x 16 block, so colour bleeds a few pixels off the tissue.
    far = ~ndimage.binary_dilation(truth, iterations=16)
    assert saturation[far].max() < 12


def test_tissue_mask_truth_agrees_with_pixels(by_class: dict[str, SyntheticSlide]) -> None:
    slide = by_class["low-grade"]
    rgb = _level(slide.path, 1)
    truth = tissue_mask_truth(slide.path, 2)
    assert truth.shape == rgb.shape[:2]
    looks_like_tissue = _saturation(rgb) > 25
    assert (looks_like_tissue != truth).mean() < 0.005
    # Away from the rim (where JPEG chroma subsampling blurs), agreement is exact.
    inner = ndimage.binary_erosion(truth, iterations=3)
    outer = ~ndimage.binary_dilation(truth, iterations=3)
    assert looks_like_tissue[inner].all()
    assert not looks_like_tissue[outer].any()
    # Tissue pixels are not white.
    assert rgb[inner].mean() < 215

    # A region is a window of the full mask, and the sidecar path works as input too.
    full = tissue_mask_truth(sidecar_path(slide.path), 4)
    assert full.shape == (768, 1024)
    np.testing.assert_array_equal(
        tissue_mask_truth(slide, 4, region=(100, 50, 300, 200)), full[50:250, 100:400]
    )
    # Piece boxes in the sidecar are the exact level-0 extents of the mask.
    x, y, w, h = slide.pieces[0]
    window = tissue_mask_truth(slide, 1, region=(x - 1, y - 1, w + 2, h + 2))
    assert window[1:-1, 1:-1].any(axis=0).all() and window[1:-1, 1:-1].any(axis=1).all()
    assert not window[0].any() and not window[-1].any()
    assert not window[:, 0].any() and not window[:, -1].any()


def test_normal_slides_have_no_lesions(by_class: dict[str, SyntheticSlide], tmp_path: Path) -> None:
    normal = by_class["normal"]
    info = read_sidecar(normal.sidecar)
    assert normal.label == "normal" and normal.label_index == 0
    assert normal.lesion_boxes == () and info["lesions"] == [] and info["lesion_fraction"] == 0
    by_index = write_synthetic_slide(tmp_path / "n.tif", (1024, 1024), 0, seed=1)
    assert by_index.label == "normal" and by_index.lesion_boxes == ()


def test_sidecar_and_dataclass_agree(by_class: dict[str, SyntheticSlide]) -> None:
    slide = by_class["high-grade"]
    assert slide.sidecar == slide.path.with_name("high-grade.tif.json")
    info = read_sidecar(slide.path)
    assert read_sidecar(slide.sidecar) == info
    assert SyntheticSlide.from_sidecar(slide.sidecar) == slide
    assert info["classes"] == list(SYNTHETIC_CLASSES)
    assert info["label_index"] == 2 and info["size"] == list(SIZE)
    assert info["mpp"] == 0.5 and info["magnification"] == 20.0 and info["tile_size"] == 256
    assert [p["box"] for p in info["pieces"]] == [list(b) for b in slide.pieces]
    assert [(les["class"], les["box"]) for les in info["lesions"]] == [
        (c, list(b)) for c, b in zip(slide.lesion_classes, slide.lesion_boxes, strict=True)
    ]
    assert 0 < info["tissue_fraction"] < 1
    # Pieces are separated by background: their boxes do not overlap.
    for i, (ax, ay, aw, ah) in enumerate(slide.pieces):
        for bx, by, bw, bh in slide.pieces[i + 1 :]:
            assert ax + aw <= bx or bx + bw <= ax or ay + ah <= by or by + bh <= ay


def test_mixed_slide_is_labelled_by_its_highest_risk_lesion(tmp_path: Path) -> None:
    slide = write_synthetic_slide(
        tmp_path / "m.tif",
        (3072, 2048),
        "carcinoma",
        seed=5,
        n_lesions=2,
        lesion_size=48,
        mixed=True,
        levels=1,
    )
    assert slide.label == "carcinoma"
    assert slide.lesion_classes.count("carcinoma") == 2
    assert len(slide.lesion_classes) == 3
    assert set(slide.lesion_classes) - {"carcinoma"} <= {"low-grade", "high-grade"}


def test_warns_when_lesions_are_not_rare(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="of the tissue"):
        write_synthetic_slide(tmp_path / "w.tif", (2048, 2048), "carcinoma", lesion_size=100)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": (0, 512)}, "width must be positive"),
        ({"size": (512, -3)}, "height must be positive"),
        ({"size": (512,)}, "size must be"),
        ({"size": (512.5, 512)}, "width must be an integer"),
        ({"label": "benign"}, "unknown label 'benign'"),
        ({"label": 4}, "label index 4 out of range"),
        ({"tile_size": 200}, "tile_size must be a multiple of 16"),
        ({"tile_size": 0}, "tile_size must be >= 16"),
        ({"tile_size": 4096}, "tile_size must be <= 2048"),
        ({"size": (32, 512)}, "width must be at least 64"),
        ({"mpp": 0.0}, "mpp must be positive"),
        ({"quality": 101}, "quality must be <= 100"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"levels": 20}, "levels=20 is too many"),
        ({"label": "normal", "n_lesions": 2}, "n_lesions must be 0"),
        ({"label": "carcinoma", "n_lesions": 0}, "needs at least one lesion"),
        ({"label": "carcinoma", "lesion_size": 600}, "lesion_size=600"),
        ({"classes": ("normal",)}, "at least 2 names"),
        ({"classes": ("a", "a")}, "unique"),
    ],
)
def test_bad_arguments_raise_value_error(tmp_path: Path, kwargs: dict, match: str) -> None:
    args = {"size": (1024, 1024), "label": "low-grade", **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(ValueError, match=match):
            write_synthetic_slide(tmp_path / "bad.tif", **args)
    assert not (tmp_path / "bad.tif").exists()


def test_mask_truth_rejects_bad_downsample(by_class: dict[str, SyntheticSlide]) -> None:
    with pytest.raises(ValueError, match="downsample"):
        tissue_mask_truth(by_class["normal"], 0)


def test_read_sidecar_rejects_foreign_json(tmp_path: Path) -> None:
    (tmp_path / "x.tif.json").write_text('{"label": "normal"}')
    with pytest.raises(ValueError, match="not a synthetic-slide sidecar"):
        read_sidecar(tmp_path / "x.tif")


@pytest.mark.slow
def test_writing_a_large_slide_keeps_memory_bounded(tmp_path: Path) -> None:
    resource = pytest.importorskip("resource")
    del resource  # used in the child process
    script = textwrap.dedent(
        f"""
        import resource, sys
        from napari_slide_attention.slide.synthetic import write_synthetic_slide
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes vs KiB
        # Warm up codecs and lazy imports so the baseline includes them.
        write_synthetic_slide({str(tmp_path / "warm.tif")!r}, (1024, 1024), "low-grade",
                              lesion_size=16)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        write_synthetic_slide({str(tmp_path / "big.tif")!r}, (16384, 16384), "carcinoma",
                              levels=2)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        print(after - before)
        """
    )
    src = str(Path(napari_slide_attention.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    growth = int(done.stdout.split()[-1])
    level0 = 16384 * 16384 * 3
    assert growth < 150 * 2**20, f"peak RSS grew by {growth / 2**20:.0f} MB"
    assert growth < level0 / 5
    big = tmp_path / "big.tif"
    try:
        with tifffile.TiffFile(big) as tif:
            assert tif.series[0].levels[0].shape == (16384, 16384, 3)
            assert [lvl.shape for lvl in tif.series[0].levels][1] == (8192, 8192, 3)
    finally:
        big.unlink()  # pytest keeps recent tmp dirs around; do not leave ~100 MB behind
