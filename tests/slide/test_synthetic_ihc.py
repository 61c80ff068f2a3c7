"""Synthetic IHC slides (HER2, MMR): determinism, tumour share, the class in the pixels,
distractors in every class, the sidecar, and the samples."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage
from skimage.color import rgb2hed

from napari_slide_attention.slide.synthetic import (
    ARTEFACT_KINDS,
    HER2_CLASSES,
    IHC_SETTINGS,
    MMR_CLASSES,
    SyntheticSlide,
    artefact_mask_truth,
    read_sidecar,
    sample_slide,
    tissue_mask_truth,
    tumour_mask_truth,
    write_synthetic_slide,
)
from napari_slide_attention.slide.synthetic.ihc_layout import make_ihc_layout

# One tissue piece, so the tumour and the stroma around it are large enough to measure.
SIZE = (1536, 1024)
SEED = 4


def _level(path: Path, level: int = 0) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        return tif.series[0].levels[level].asarray()


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], SyntheticSlide]:
    """One slide per class of both stains, all from the same seed, written once."""
    root = tmp_path_factory.mktemp("ihc")
    out = {}
    for stain, classes in (("her2", HER2_CLASSES), ("mmr", MMR_CLASSES)):
        for label in classes:
            name = label.replace("+", "plus")
            out[stain, label] = write_synthetic_slide(
                root / f"{stain}-{name}.tif", SIZE, label, SEED, stain=stain, n_pieces=1
            )
    return out


class Measured:
    """A slide's level 0 unmixed into haematoxylin and DAB, with its truth masks."""

    def __init__(self, slide: SyntheticSlide) -> None:
        self.info = read_sidecar(slide.path)
        self.rgb = rgb = _level(slide.path)
        hed = rgb2hed(rgb)
        self.h, self.dab = hed[..., 0], hed[..., 2]
        # Nuclei are the darkest things in the tissue: total optical density above 1.2.
        self.nuclei = -np.log(np.maximum(rgb, 1) / 255.0).sum(axis=-1) > 1.2
        self.tumour = tumour_mask_truth(self.info, 1)
        # Plain tissue: away from the rim (edge effect, JPEG blending), the tumour and
        # every distractor.
        tissue = ndimage.binary_erosion(tissue_mask_truth(self.info, 1), iterations=40)
        distractors = np.zeros_like(tissue)
        for item in self.info["artefact_boxes"]:
            x, y, w, h = item["box"]
            distractors[max(0, y - 40) : y + h + 40, max(0, x - 40) : x + w + 40] = True
        near_tumour = ndimage.binary_dilation(self.tumour, iterations=30)
        self.normal = tissue & ~near_tumour & ~distractors


@pytest.fixture(scope="module")
def measured(slides: dict[tuple[str, str], SyntheticSlide]) -> dict[tuple[str, str], Measured]:
    return {key: Measured(slide) for key, slide in slides.items()}


def test_same_seed_gives_identical_files_and_other_seeds_differ(tmp_path: Path) -> None:
    kwargs = {"size": (1024, 768), "label": "2+", "stain": "her2"}
    a = write_synthetic_slide(tmp_path / "a" / "s.tif", seed=7, **kwargs)
    b = write_synthetic_slide(tmp_path / "b" / "s.tif", seed=7, **kwargs)
    c = write_synthetic_slide(tmp_path / "c" / "s.tif", seed=8, **kwargs)

    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.sidecar.read_bytes() == b.sidecar.read_bytes()
    assert a.path.read_bytes() != c.path.read_bytes()
    assert a.tumour_boxes != c.tumour_boxes
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["s.tif", "s.tif.json"]


def test_tumour_covers_10_to_30_percent_of_the_tissue(slides, measured) -> None:
    for key, m in measured.items():
        tissue = tissue_mask_truth(m.info, 1)
        share = m.tumour.sum() / tissue.sum()
        assert 0.10 <= share <= 0.30, key
        assert m.info["tumour_fraction"] == pytest.approx(share, abs=1e-9)
        assert not (m.tumour & ~tissue).any()  # tumour lies in the tissue
    # Many layouts, several slide shapes: the share stays in range, measured on the masks.
    shapes = [(1024, 768)] * 6 + [(2048, 1024), (512, 768)]
    for seed, size in enumerate(shapes):
        layout = make_ihc_layout(*size, seed, mpp=0.5, n_pieces=None)
        info = {
            "size": list(size),
            "stain": "her2",
            "pieces": [{"shape": p} for p in layout["pieces"]],
            "lesions": [{"shape": t} for t in layout["tumours"]],
        }
        share = tumour_mask_truth(info, 4).sum() / tissue_mask_truth(info, 4).sum()
        assert 0.10 <= share <= 0.30, (seed, size, share)


def test_layout_and_distractors_are_the_same_in_every_class(slides) -> None:
    infos = {key: read_sidecar(slide.path) for key, slide in slides.items()}
    reference = infos["her2", "0"]
    kinds = [a["kind"] for a in reference["artefact_boxes"]]
    assert set(kinds) == set(ARTEFACT_KINDS)  # every kind of distractor is there
    for key, info in infos.items():
        # Distractors carry no label information: the same boxes whatever the class.
        assert info["artefact_boxes"] == reference["artefact_boxes"], key
        assert info["tumour_boxes"] == reference["tumour_boxes"], key
        assert [p["box"] for p in info["pieces"]] == [p["box"] for p in reference["pieces"]]


def test_her2_membrane_dab_rises_with_the_score(measured) -> None:
    mean, high, plain = [], [], []
    for score in HER2_CLASSES:
        m = measured["her2", score]
        dab = m.dab[m.tumour]
        mean.append(dab.mean())
        high.append(np.percentile(dab, 95))  # the membranes: the tumour's brownest pixels
        plain.append(m.dab[m.normal].mean())
    assert all(a < b for a, b in itertools.pairwise(mean)), mean
    assert all(a * 1.2 < b for a, b in itertools.pairwise(high)), high
    # 3+ is strong: its membranes are several times as brown as a 1+ case's.
    assert high[3] > 3 * high[1]
    # Outside the tumour the slides are alike: the score is only in the tumour.
    assert max(plain) - min(plain) < 0.1 * np.mean(plain), plain
    assert high[0] < 2 * np.mean(plain)  # score 0: next to no membrane staining


def test_mmr_tumour_nuclei_keep_or_lose_dab_and_normal_nuclei_stain_in_both(measured) -> None:
    intact, loss = measured["mmr", "intact"], measured["mmr", "loss"]

    def nuclear_dab(m: Measured, where: np.ndarray) -> float:
        return float(m.dab[where & m.nuclei].mean())

    tumour_intact = nuclear_dab(intact, intact.tumour)
    tumour_loss = nuclear_dab(loss, loss.tumour)
    normal_intact = nuclear_dab(intact, intact.normal)
    normal_loss = nuclear_dab(loss, loss.normal)
    assert tumour_intact > 4 * tumour_loss
    # The internal control: normal nuclei are stained on both, as strongly as intact tumour.
    assert normal_loss > 4 * tumour_loss
    assert normal_intact == pytest.approx(normal_loss, rel=0.1)
    assert normal_loss > 0.5 * tumour_intact
    # Lost tumour nuclei are blue: haematoxylin, no brown.
    assert loss.h[loss.tumour & loss.nuclei].mean() > intact.h[intact.tumour & intact.nuclei].mean()
    # HER2 slides have no nuclear DAB anywhere: normal nuclei there are blue.
    her2 = measured["her2", "0"]
    assert nuclear_dab(her2, her2.normal) < 0.5 * normal_loss


def test_tumour_stands_out_at_low_resolution_even_without_staining(slides) -> None:
    """At 16 µm per pixel (the dual model's x32 view of a 0.5 µm slide) the tumour is
    darker than the stroma by its crowded nuclei alone (HER2 0, MMR loss)."""
    for key in (("her2", "0"), ("mmr", "loss")):
        info = read_sidecar(slides[key].path)
        level1 = _level(slides[key].path, 1).astype(np.float64)  # 1 µm per pixel
        h, w = level1.shape[0] // 8 * 8, level1.shape[1] // 8 * 8
        low = level1[:h, :w].reshape(h // 8, 8, w // 8, 8, 3).mean(axis=(1, 3))
        tumour = tumour_mask_truth(info, 16)[: h // 8, : w // 8]
        tissue = tissue_mask_truth(info, 16)[: h // 8, : w // 8]
        core = ndimage.binary_erosion(tumour)
        stroma = ndimage.binary_erosion(tissue, iterations=2) & ~ndimage.binary_dilation(
            tumour, iterations=2
        )
        assert core.sum() > 10 and stroma.sum() > 50
        od = -np.log(low / 255.0).sum(axis=-1)
        assert od[core].mean() > 1.15 * od[stroma].mean(), key
        assert low[core].mean() < low[stroma].mean() - 8, key


def test_each_distractor_is_dark_and_the_dab_like_ones_brown(measured) -> None:
    for score in ("0", "3+"):
        m = measured["her2", score]
        od = -np.log(np.maximum(m.rgb, 1) / 255.0).sum(axis=-1)
        plain_od, plain_dab = od[m.normal].mean(), m.dab[m.normal].mean()
        everything = artefact_mask_truth(m.info, 1)
        for kind in ARTEFACT_KINDS:
            mask = artefact_mask_truth(m.info, 1, kinds=[kind])
            assert mask.any() and not (mask & ~everything).any(), kind
            assert od[mask].mean() > 1.5 * plain_od, kind
            if kind != "fold":  # a fold doubles whatever is there
                assert m.dab[mask].mean() > 2 * plain_dab, kind
            # Distractors lie outside the tumour, and inside their boxes.
            assert not (mask & m.tumour).any(), kind
            covered = np.zeros_like(mask)
            for item in m.info["artefact_boxes"]:
                if item["kind"] == kind:
                    x, y, w, h = item["box"]
                    covered[y : y + h, x : x + w] = True
            assert not (mask & ~covered).any(), kind


def test_sidecar_round_trip_and_tumour_boxes(slides) -> None:
    slide = slides["her2", "2+"]
    info = read_sidecar(slide.path)
    assert SyntheticSlide.from_sidecar(slide.sidecar) == slide
    assert slide.stain == info["stain"] == "her2"
    assert info["classes"] == list(HER2_CLASSES) and info["label"] == "2+"
    assert info["ihc_settings"] == IHC_SETTINGS
    assert len(slide.artefact_boxes) == len(info["artefact_boxes"])
    assert {kind for kind, _ in slide.artefact_boxes} == set(ARTEFACT_KINDS)
    # The tumour regions are also the lesions, of the slide's class (cohorts read them).
    assert slide.tumour_boxes and slide.lesion_boxes == slide.tumour_boxes
    assert set(slide.lesion_classes) == {"2+"}
    json.dumps(info)  # plain JSON all through
    # Each tumour box is the exact level-0 extent of its region's part of the mask.
    for lesion, (x, y, w, h) in zip(info["lesions"], slide.tumour_boxes, strict=True):
        alone = {**info, "lesions": [lesion]}
        window = tumour_mask_truth(alone, 1, region=(x - 1, y - 1, w + 2, h + 2))
        assert window[1, 1:-1].any() and window[-2, 1:-1].any()
        assert window[1:-1, 1].any() and window[1:-1, -2].any()
        assert not window[0].any() and not window[-1].any()
        assert not window[:, 0].any() and not window[:, -1].any()
    # Together the boxes hold the whole tumour.
    covered = np.zeros((SIZE[1], SIZE[0]), dtype=bool)
    for x, y, w, h in slide.tumour_boxes:
        covered[y : y + h, x : x + w] = True
    assert not (tumour_mask_truth(info, 1) & ~covered).any()
    # A window of the mask is the mask of the window, at any downsample.
    full = tumour_mask_truth(slide, 4)
    assert full.shape == (SIZE[1] // 4, SIZE[0] // 4)
    np.testing.assert_array_equal(
        tumour_mask_truth(slide.path, 4, region=(30, 20, 100, 90)), full[20:110, 30:130]
    )


def test_h_and_e_sidecars_still_read(tmp_path: Path) -> None:
    he = write_synthetic_slide(
        tmp_path / "he.tif", (1024, 768), "carcinoma", seed=1, lesion_size=16
    )
    assert he.stain == "he" and he.tumour_boxes == () and he.artefact_boxes == ()
    info = read_sidecar(he.path)
    assert "stain" not in info  # H&E sidecars are written as before
    # A sidecar from before IHC slides existed (no new fields at all) reads the same.
    legacy = {k: v for k, v in info.items()}
    (tmp_path / "old.tif.json").write_text(json.dumps(legacy))
    old = SyntheticSlide.from_sidecar(tmp_path / "old.tif.json")
    assert old.stain == "he" and old.lesion_boxes == he.lesion_boxes
    with pytest.raises(ValueError, match="not tumour regions"):
        tumour_mask_truth(info)
    with pytest.raises(ValueError, match="no distractors"):
        artefact_mask_truth(info)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stain": "ki67"}, "unknown stain 'ki67'; expected one of he, her2, mmr"),
        ({"stain": "her2", "label": "carcinoma"}, "unknown label 'carcinoma'"),
        ({"stain": "mmr", "label": 2}, "label index 2 out of range"),
        ({"stain": "her2", "classes": ("a", "b")}, "classes are fixed"),
        ({"stain": "her2", "n_lesions": 3}, "H&E slides"),
        ({"stain": "mmr", "size": (400, 1024)}, "at least 512 px"),
    ],
)
def test_bad_ihc_arguments_raise_value_error(tmp_path: Path, kwargs: dict, match: str) -> None:
    args = {"size": (1024, 1024), **kwargs}
    with pytest.raises(ValueError, match=match):
        write_synthetic_slide(tmp_path / "bad.tif", **args)
    assert not (tmp_path / "bad.tif").exists()


def test_the_her2_sample_is_written_once_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from napari_slide_attention.slide.synthetic import writer

    monkeypatch.setattr(writer, "_SAMPLE_SIZE", (1024, 768))  # the real one takes ~25 s
    path = sample_slide(tmp_path, stain="her2")
    info = read_sidecar(path)
    assert info["stain"] == "her2" and info["label"] == "3+" and info["size"] == [1024, 768]
    mtime = path.stat().st_mtime_ns
    assert sample_slide(tmp_path, stain="her2") == path
    assert path.stat().st_mtime_ns == mtime
    assert path.name == "synthetic-her2-3+-seed0-1024x768.tif"  # not the H&E sample's


def test_the_tissue_detector_finds_the_pale_ihc_tissue(slides) -> None:
    from napari_slide_attention.slide.reader import open_slide
    from napari_slide_attention.slide.tissue import tissue_mask

    slide = slides["her2", "0"]
    with open_slide(slide.path) as opened:
        mask = tissue_mask(opened)
    truth = tissue_mask_truth(slide, mask.downsample)[: mask.mask.shape[0], : mask.mask.shape[1]]
    missed = (truth & ~mask.mask).sum() / truth.sum()
    assert missed < 0.02


def test_napari_offers_the_her2_sample(slides, monkeypatch: pytest.MonkeyPatch) -> None:
    npe2 = pytest.importorskip("npe2")
    from napari_slide_attention._napari import sample_data

    manifest = npe2.PluginManifest.from_file(Path(sample_data.__file__).parents[1] / "napari.yaml")
    samples = {s.key: s for s in manifest.contributions.sample_data}
    assert samples["her2_slide"].display_name == "Synthetic HER2 IHC slide"
    commands = {c.id: c for c in manifest.contributions.commands}
    target = commands[samples["her2_slide"].command].python_name
    assert target == "napari_slide_attention._napari.sample_data:make_her2_sample_slide"

    asked = []
    her2 = slides["her2", "3+"].path

    def fake_sample(directory=None, stain="he"):
        asked.append(stain)
        return her2

    monkeypatch.setattr(sample_data, "sample_slide", fake_sample)
    [(data, meta, kind)] = sample_data.make_her2_sample_slide()
    assert asked == ["her2"] and kind == "image" and meta["rgb"]
    assert data[0].shape == (SIZE[1], SIZE[0], 3)
