"""The ground truth of a synthetic slide: its JSON sidecar and its exact tissue mask.

``slide.tif`` has ``slide.tif.json`` next to it, holding the label, the classes, the seed,
the tissue pieces (box and shape) and the lesions (box, class, shape). The tissue mask is
rendered from the pieces' shapes with the same functions the renderer drew them with.

IHC slides' sidecars also hold ``stain`` (``"her2"`` or ``"mmr"``; H&E sidecars have
none and read as ``"he"``), ``tumour_boxes``, ``tumour_fraction``, ``artefact_boxes``
(each with its ``kind``), ``staining`` and ``ihc_settings``; their ``lesions`` are the
tumour regions, of the slide's class. :func:`tumour_mask_truth` and
:func:`artefact_mask_truth` render the exact tumour and distractor masks.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..boxes import Box
from .checks import check_positive_float
from .shapes import centres, pieces_mask, span

SYNTHETIC_CLASSES: tuple[str, ...] = ("normal", "low-grade", "high-grade", "carcinoma")
"""Class names ordered by risk; index 0 is the lesion-free class."""

GENERATOR = "napari-slide-attention synthetic"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SyntheticSlide:
    """What :func:`write_synthetic_slide` wrote.

    Attributes:
        path: The TIFF file.
        sidecar: The JSON ground-truth file next to it.
        label: Slide label (class name), the highest-risk lesion class present.
        label_index: Index of ``label`` in ``classes``.
        classes: Class names ordered by risk, index 0 being lesion-free.
        size: Level-0 ``(width, height)`` in pixels.
        mpp: Microns per pixel at level 0.
        pieces: Level-0 ``(x, y, w, h)`` bounding boxes of the tissue pieces.
        lesion_boxes: Level-0 ``(x, y, w, h)`` boxes of the lesions.
        lesion_classes: Class name of each lesion, parallel to ``lesion_boxes``.
        levels: Number of pyramid levels written.
        seed: Seed the slide was generated from.
        stain: ``"he"``, ``"her2"`` or ``"mmr"``.
        tumour_boxes: IHC: level-0 boxes of the tumour regions (on tissue).
        artefact_boxes: IHC: ``(kind, box)`` of each distractor.
    """

    path: Path
    sidecar: Path
    label: str
    label_index: int
    classes: tuple[str, ...]
    size: tuple[int, int]
    mpp: float
    pieces: tuple[Box, ...]
    lesion_boxes: tuple[Box, ...]
    lesion_classes: tuple[str, ...]
    levels: int
    seed: int
    stain: str = "he"
    tumour_boxes: tuple[Box, ...] = ()
    artefact_boxes: tuple[tuple[str, Box], ...] = ()

    @classmethod
    def from_sidecar(cls, path: str | os.PathLike[str]) -> SyntheticSlide:
        """Rebuild the description of a slide from its sidecar.

        Args:
            path: The slide path or its sidecar path.

        Returns:
            The slide description.
        """
        info = read_sidecar(path)
        slide_path = _slide_path(Path(path))
        return cls(
            path=slide_path,
            sidecar=sidecar_path(slide_path),
            label=info["label"],
            label_index=int(info["label_index"]),
            classes=tuple(info["classes"]),
            size=(int(info["size"][0]), int(info["size"][1])),
            mpp=float(info["mpp"]),
            pieces=tuple(_box(p["box"]) for p in info["pieces"]),
            lesion_boxes=tuple(_box(les["box"]) for les in info["lesions"]),
            lesion_classes=tuple(les["class"] for les in info["lesions"]),
            levels=int(info["levels"]),
            seed=int(info["seed"]),
            stain=str(info.get("stain", "he")),
            tumour_boxes=tuple(_box(b) for b in info.get("tumour_boxes", ())),
            artefact_boxes=tuple(
                (str(a["kind"]), _box(a["box"])) for a in info.get("artefact_boxes", ())
            ),
        )


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """Return the sidecar path of a slide (``slide.tif`` -> ``slide.tif.json``).

    Args:
        path: The slide path, or already a sidecar path (returned unchanged).

    Returns:
        The sidecar path.
    """
    path = Path(path)
    if path.suffix.lower() == ".json":
        return path
    return path.with_name(path.name + ".json")


def read_sidecar(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the ground truth written next to a synthetic slide.

    Args:
        path: The slide path or its sidecar path.

    Returns:
        The sidecar content (label, classes, seed, size, pieces, lesions, ...).

    Raises:
        FileNotFoundError: If there is no sidecar.
        ValueError: If the file is not a synthetic-slide sidecar.
    """
    side = sidecar_path(path)
    try:
        info = json.loads(side.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{side} is not valid JSON: {exc}") from exc
    if not isinstance(info, dict) or info.get("generator") != GENERATOR:
        raise ValueError(f"{side} is not a synthetic-slide sidecar")
    return info


def tissue_mask_truth(
    info_or_path: Mapping[str, Any] | SyntheticSlide | str | os.PathLike[str],
    downsample: float = 1.0,
    *,
    region: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Render the ground-truth tissue mask of a synthetic slide.

    Pixel ``(i, j)`` of the result is the tissue state at level-0 position
    ``((j + 0.5) * downsample, (i + 0.5) * downsample)``, which is the centre of pixel
    ``(i, j)`` of a pyramid level with that downsample; the renderer uses the same shape
    function at the same positions, so the mask matches the written pixels exactly (before
    JPEG).

    Args:
        info_or_path: A sidecar dict, a :class:`SyntheticSlide`, or a slide/sidecar path.
        downsample: Level-0 pixels per output pixel (> 0).
        region: Optional ``(x, y, w, h)`` window in output pixels; default the whole slide,
            ``(ceil(height / downsample), ceil(width / downsample))`` pixels.

    Returns:
        A boolean array, True on tissue.

    Raises:
        ValueError: If ``downsample`` or ``region`` is invalid.
    """
    info, (rx, ry, rw, rh) = _truth_window(info_or_path, downsample, region)
    pieces = [p["shape"] for p in info["pieces"]]
    return pieces_mask(pieces, rx, ry, rw, rh, float(downsample))


def tumour_mask_truth(
    info_or_path: Mapping[str, Any] | SyntheticSlide | str | os.PathLike[str],
    downsample: float = 1.0,
    *,
    region: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Render the ground-truth tumour mask of a synthetic IHC slide.

    Pixels are placed as in :func:`tissue_mask_truth`; a pixel is tumour when it lies
    inside a tumour region and inside the tissue, with the shape functions the renderer
    used, so the mask matches the written slide exactly (before JPEG).

    Args:
        info_or_path: A sidecar dict, a :class:`SyntheticSlide`, or a slide/sidecar path.
        downsample: Level-0 pixels per output pixel (> 0).
        region: Optional ``(x, y, w, h)`` window in output pixels; default the whole slide.

    Returns:
        A boolean array, True on tumour.

    Raises:
        ValueError: If the slide is not an IHC slide, or ``downsample`` or ``region`` is
            invalid.
    """
    info, (rx, ry, rw, rh) = _truth_window(info_or_path, downsample, region)
    stain = info.get("stain", "he")
    if stain == "he":
        raise ValueError(
            "an H&E needle slide has lesions, not tumour regions; tumour masks are for "
            "IHC slides (stain her2 or mmr)"
        )
    from .ihc_shapes import tumour_mask  # only IHC slides need it

    pieces = [p["shape"] for p in info["pieces"]]
    regions = [les["shape"] for les in info["lesions"]]
    return tumour_mask(pieces, regions, rx, ry, rw, rh, float(downsample))


def artefact_mask_truth(
    info_or_path: Mapping[str, Any] | SyntheticSlide | str | os.PathLike[str],
    downsample: float = 1.0,
    *,
    region: tuple[int, int, int, int] | None = None,
    kinds: Sequence[str] | None = None,
) -> np.ndarray:
    """Render the ground-truth mask of a synthetic IHC slide's distractors.

    Pixels are placed as in :func:`tissue_mask_truth`. Pen ink counts wherever it lies,
    on glass too; the other kinds only on tissue. Each distractor lies inside its box in
    ``artefact_boxes`` (the box of its part on tissue; a pen stroke's whole box).

    Args:
        info_or_path: A sidecar dict, a :class:`SyntheticSlide`, or a slide/sidecar path.
        downsample: Level-0 pixels per output pixel (> 0).
        region: Optional ``(x, y, w, h)`` window in output pixels; default the whole slide.
        kinds: Only these kinds (``dab_stroma``, ``dab_duct``, ``fold``, ``pen``,
            ``vessel``); default all.

    Returns:
        A boolean array, True on a distractor.

    Raises:
        ValueError: If the slide is not an IHC slide, or ``downsample`` or ``region`` is
            invalid.
    """
    info, (rx, ry, rw, rh) = _truth_window(info_or_path, downsample, region)
    if info.get("stain", "he") == "he":
        raise ValueError("an H&E needle slide has no distractors; they are for IHC slides")
    from .ihc_shapes import arc_distance, band_distance, blob_depth  # only IHC slides

    xs = centres(rx, rw, float(downsample))
    ys = centres(ry, rh, float(downsample))
    on_tissue = np.zeros((rh, rw), dtype=bool)
    pen = np.zeros((rh, rw), dtype=bool)
    for item in info["artefact_boxes"]:
        if kinds is not None and item["kind"] not in kinds:
            continue
        shape = item["shape"]
        if item["kind"] == "pen":
            pen |= arc_distance(shape, xs, ys) < shape["width"] / 2.0
            continue
        x, y, w, h = item["box"]  # the box holds the part on tissue
        sx, sy = span(xs, x, x + w), span(ys, y, y + h)
        if sx.start >= sx.stop or sy.start >= sy.stop:
            continue
        if item["kind"] == "fold":
            inside = band_distance(shape, xs[sx], ys[sy]) < 0.0
        else:
            inside = blob_depth(shape, xs[sx], ys[sy]) > 0.0
        on_tissue[sy, sx] |= inside
    pieces = [p["shape"] for p in info["pieces"]]
    return (on_tissue & pieces_mask(pieces, rx, ry, rw, rh, float(downsample))) | pen


def _truth_window(
    info_or_path: Mapping[str, Any] | SyntheticSlide | str | os.PathLike[str],
    downsample: float,
    region: tuple[int, int, int, int] | None,
) -> tuple[Mapping[str, Any], tuple[int, int, int, int]]:
    """The sidecar and the output window of a truth mask, checked."""
    if isinstance(info_or_path, SyntheticSlide):
        info: Mapping[str, Any] = read_sidecar(info_or_path.sidecar)
    elif isinstance(info_or_path, Mapping):
        info = info_or_path
    else:
        info = read_sidecar(info_or_path)
    check_positive_float("downsample", downsample)
    width, height = (int(v) for v in info["size"])
    if region is None:
        return info, (0, 0, math.ceil(width / downsample), math.ceil(height / downsample))
    rx, ry, rw, rh = (int(v) for v in region)
    if rw <= 0 or rh <= 0 or rx < 0 or ry < 0:
        raise ValueError(f"region must have x, y >= 0 and w, h > 0, got {region}")
    return info, (rx, ry, rw, rh)


def _box(value: Sequence[Any]) -> Box:
    x, y, w, h = (int(v) for v in value)
    return x, y, w, h


def _slide_path(path: Path) -> Path:
    if path.suffix.lower() == ".json":
        return path.with_name(path.name[: -len(".json")])
    return path
