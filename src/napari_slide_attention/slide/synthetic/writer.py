"""Write a synthetic slide: the pyramidal JPEG-tiled TIFF, its sidecar, and the demo slide.

Everything is a pure function of the arguments (seed included), so the same call writes
byte-identical files; the file and its sidecar are renamed into place, so a half-written
slide is never taken for a finished one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from .checks import check_classes, check_int, check_label, check_positive_float, check_size
from .ihc import IHC_SETTINGS, check_stain, ihc_truth, stain_classes, staining
from .ihc_layout import make_ihc_layout
from .ihc_rendering import IhcRenderer
from .layout import make_layout
from .rendering import Renderer, level_shape
from .truth import (
    FORMAT_VERSION,
    GENERATOR,
    SYNTHETIC_CLASSES,
    SyntheticSlide,
    read_sidecar,
    sidecar_path,
)

# Reduced levels stop once the largest side fits a thumbnail-sized image.
_TOP_LEVEL_MAX_SIDE = 1024

_SAMPLE_SIZE = (8192, 6144)
_SAMPLE_LABEL = "carcinoma"
_SAMPLE_SEED = 0
# The IHC samples: a clear-cut case of each stain.
_IHC_SAMPLE_LABELS = {"her2": "3+", "mmr": "loss"}
# Below this an IHC slide has no room for its tumour, ducts and distractors.
_IHC_MIN_SIDE = 512


def write_synthetic_slide(
    path: str | os.PathLike[str],
    size: tuple[int, int] = _SAMPLE_SIZE,
    label: str | int | None = None,
    seed: int = 0,
    *,
    stain: str = "he",
    tile_size: int = 256,
    mpp: float = 0.5,
    magnification: float = 20.0,
    n_pieces: int | None = None,
    n_lesions: int | None = None,
    lesion_size: int = 100,
    classes: Sequence[str] | None = None,
    quality: int = 90,
    levels: int | None = None,
    mixed: bool = False,
) -> SyntheticSlide:
    """Write a deterministic synthetic whole-slide image and its ground-truth sidecar.

    The slide is a pyramidal TIFF (RGB, JPEG-compressed tiles, reduced levels in SubIFDs of
    the first page), written tile by tile so memory does not grow with the slide size.

    Args:
        path: Where to write the TIFF; the sidecar goes to ``<path>.json``.
        size: Level-0 ``(width, height)`` in pixels.
        label: Slide class, as a name from ``classes`` or an index into it; default
            ``"carcinoma"`` for H&E, the highest class of an IHC stain. H&E class 0
            slides have no lesions; class ``k > 0`` slides have lesions of class ``k``. An
            IHC slide's class is how its tumour stains.
        seed: Seed for the layout and textures; same arguments give identical files.
        stain: ``"he"`` (needle-in-a-haystack H&E), ``"her2"`` (membrane IHC, classes 0,
            1+, 2+, 3+) or ``"mmr"`` (nuclear IHC, classes intact, loss); see
            :mod:`.ihc`.
        tile_size: Tile width and height in pixels, a multiple of 16.
        mpp: Microns per pixel at level 0.
        magnification: Nominal objective magnification at level 0.
        n_pieces: Number of tissue pieces; default 1 to 3, chosen by the seed.
        n_lesions: H&E: number of lesions of the label's class; default 2 to 4 chosen by
            the seed (0 for class 0).
        lesion_size: H&E: approximate lesion side in level-0 pixels.
        classes: H&E: class names ordered by risk, index 0 being lesion-free. An IHC
            stain's classes are fixed.
        quality: JPEG quality, 1 to 100.
        levels: Number of pyramid levels including level 0; default halves until the largest
            side is at most 1024 pixels.
        mixed: H&E: also add one lesion of a lower, non-zero class (for labels of class 2
            or higher), so the label is set by the highest-risk lesion rather than the only
            one.

    Returns:
        A description of what was written.

    Raises:
        ValueError: If an argument is out of range, or the lesions (tumour, distractors)
            cannot be placed inside the tissue.
    """
    path = Path(path)
    stain = check_stain(stain)
    if stain == "he":
        classes = check_classes(SYNTHETIC_CLASSES if classes is None else classes)
    else:
        fixed = stain_classes(stain)
        if classes is not None and tuple(classes) != fixed:
            raise ValueError(f"a {stain} slide's classes are fixed: {list(fixed)}")
        if n_lesions is not None or mixed:
            raise ValueError("n_lesions and mixed are settings of H&E slides, not IHC ones")
        classes = fixed
    width, height = check_size(size)
    if label is None:
        label = _SAMPLE_LABEL if stain == "he" else classes[-1]
    label_index = check_label(label, classes)
    check_int("seed", seed, minimum=0)
    # Larger tiles are unusual in slide files and would make the per-tile buffers large.
    check_int("tile_size", tile_size, minimum=16, maximum=2048)
    if tile_size % 16:
        raise ValueError(f"tile_size must be a multiple of 16 (JPEG/TIFF tiles), got {tile_size}")
    check_positive_float("mpp", mpp)
    check_positive_float("magnification", magnification)
    check_int("quality", quality, minimum=1, maximum=100)
    check_int("lesion_size", lesion_size, minimum=8)
    if n_pieces is not None:
        check_int("n_pieces", n_pieces, minimum=1, maximum=16)
    if n_lesions is not None:
        check_int("n_lesions", n_lesions, minimum=0, maximum=64)
        if label_index == 0 and n_lesions:
            raise ValueError(
                f"n_lesions must be 0 for the lesion-free class {classes[0]!r}, got {n_lesions}"
            )
        if label_index > 0 and n_lesions == 0:
            raise ValueError(
                f"a slide labelled {classes[label_index]!r} needs at least one lesion "
                "(n_lesions=0 given)"
            )
    if stain != "he" and min(width, height) < _IHC_MIN_SIDE:
        raise ValueError(
            f"an IHC slide needs at least {_IHC_MIN_SIDE} px a side, got {width} x {height}"
        )
    n_levels = _level_count(width, height, levels)
    # Plain Python numbers from here on: numpy scalars are not JSON-serialisable.
    seed, tile_size, quality, lesion_size = (
        int(seed),
        int(tile_size),
        int(quality),
        int(lesion_size),
    )
    mpp, magnification = float(mpp), float(magnification)

    described: dict[str, Any] = {
        "generator": GENERATOR,
        "version": FORMAT_VERSION,
        "mpp": [mpp, mpp],
        "magnification": magnification,
        "label": classes[label_index],
        "seed": seed,
    }
    if stain == "he":
        layout = make_layout(
            width,
            height,
            seed,
            label_index=label_index,
            n_classes=len(classes),
            n_pieces=n_pieces,
            n_lesions=n_lesions,
            lesion_size=lesion_size,
            mixed=mixed,
        )
        renderer: Renderer = Renderer(
            width, height, seed, tile_size, layout["pieces"], layout["lesions"], len(classes)
        )
    else:
        described["stain"] = stain
        layout = make_ihc_layout(width, height, seed, mpp=mpp, n_pieces=n_pieces)
        stain_info = staining(stain, classes[label_index], seed)
        renderer = IhcRenderer(width, height, seed, tile_size, layout, stain, stain_info, mpp)
    _write_pyramid(
        path, renderer, (width, height), n_levels, tile_size, quality, mpp, json.dumps(described)
    )

    stats = renderer.stats
    tissue_px = stats["tissue_px"]
    pieces_json = []
    for i, piece in enumerate(layout["pieces"]):
        x0, y0, x1, y1 = stats["piece_bounds"][i]
        pieces_json.append({"box": [x0, y0, x1 - x0 + 1, y1 - y0 + 1], "shape": piece})
    info: dict[str, Any] = {
        "generator": GENERATOR,
        "version": FORMAT_VERSION,
        "label": classes[label_index],
        "label_index": label_index,
        "classes": list(classes),
        "seed": seed,
        "size": [width, height],
        "mpp": mpp,
        "magnification": magnification,
        "tile_size": tile_size,
        "levels": n_levels,
        "quality": quality,
        "pieces": pieces_json,
    }
    if stain == "he":
        info["lesions"] = [
            {
                "class": classes[les["class_index"]],
                "class_index": les["class_index"],
                "box": list(les["box"]),
                "shape": {"noise_seed": les["noise_seed"]},
            }
            for les in layout["lesions"]
        ]
        info["tissue_fraction"] = tissue_px / (width * height)
        info["lesion_fraction"] = stats["lesion_px"] / tissue_px if tissue_px else 0.0
    else:
        info.update(ihc_truth(stain, layout, stats, classes, label_index, stain_info))
        info["tissue_fraction"] = tissue_px / (width * height)
    side = sidecar_path(path)
    side_tmp = side.with_name(f".{side.name}.{os.getpid()}.tmp")
    side_tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    os.replace(side_tmp, side)
    return SyntheticSlide.from_sidecar(path)


def _write_pyramid(
    path: Path,
    renderer: Renderer,
    size: tuple[int, int],
    n_levels: int,
    tile_size: int,
    quality: int,
    mpp: float,
    description: str,
) -> None:
    """Write the renderer's tiles as a pyramidal JPEG-tiled TIFF, renamed into place."""
    width, height = size
    # Uncompressed size is a safe upper bound for JPEG output; classic TIFF offsets are
    # 32-bit, so switch to BigTIFF well before they could overflow.
    bigtiff = width * height * 3 * 4 // 3 > 2**31
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    side = sidecar_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    common: dict[str, Any] = {
        "dtype": np.uint8,
        "photometric": "rgb",
        "tile": (tile_size, tile_size),
        "compression": "jpeg",
        "compressionargs": {"level": quality},
        "resolutionunit": "CENTIMETER",
        "metadata": None,
        # One worker: with more, tifffile buffers up to 512 MB of tiles per batch.
        "maxworkers": 1,
    }
    try:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
            for level in range(n_levels):
                shape = level_shape(width, height, level)
                pixels_per_cm = 1e4 / (mpp * 2**level)
                extra: dict[str, Any] = (
                    {"subifds": n_levels - 1, "description": description}
                    if level == 0
                    else {"subfiletype": 1}
                )
                tif.write(
                    renderer.tiles(level),
                    shape=(shape[0], shape[1], 3),
                    resolution=(pixels_per_cm, pixels_per_cm),
                    **common,
                    **extra,
                )
        # A stale sidecar must never describe the new file, even if we die before the
        # new sidecar is written.
        side.unlink(missing_ok=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sample_slide(directory: str | os.PathLike[str] | None = None, stain: str = "he") -> Path:
    """Return the path of a demo slide, writing it on first use.

    The H&E demo is an 8192 x 6144 px "carcinoma" needle slide (seed 0); the IHC demos are
    8192 x 6144 px slides of seed 0 scored 3+ (HER2) or with loss of the MMR protein (MMR).
    An existing file is reused if its sidecar matches; a half-written one never is, since
    files are renamed into place.

    Args:
        directory: Where to keep it; default ``$XDG_CACHE_HOME/napari-slide-attention`` or
            ``~/.cache/napari-slide-attention``.
        stain: ``"he"``, ``"her2"`` or ``"mmr"``.

    Returns:
        The slide path.
    """
    stain = check_stain(stain)
    if directory is None:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
        directory = Path(cache) / "napari-slide-attention"
    directory = Path(directory)
    width, height = _SAMPLE_SIZE
    if stain == "he":
        label = _SAMPLE_LABEL
        name = f"synthetic-{label}-seed{_SAMPLE_SEED}-{width}x{height}.tif"
    else:
        label = _IHC_SAMPLE_LABELS[stain]
        name = f"synthetic-{stain}-{label}-seed{_SAMPLE_SEED}-{width}x{height}.tif"
    path = directory / name
    if not _sample_is_valid(path, stain, label):
        if stain == "he":
            write_synthetic_slide(path, _SAMPLE_SIZE, label, _SAMPLE_SEED)
        else:
            write_synthetic_slide(path, _SAMPLE_SIZE, label, _SAMPLE_SEED, stain=stain)
    return path


def _level_count(width: int, height: int, levels: int | None) -> int:
    longest = max(width, height)
    if levels is None:
        n = 1
        while math.ceil(longest / 2 ** (n - 1)) > _TOP_LEVEL_MAX_SIDE:
            n += 1
        return n
    check_int("levels", levels, minimum=1)
    if 2 ** (levels - 1) > longest:
        raise ValueError(
            f"levels={levels} is too many for a {width} x {height} slide "
            f"(at most {int(math.log2(longest)) + 1})"
        )
    return int(levels)


def _sample_is_valid(path: Path, stain: str, label: str) -> bool:
    try:
        info = read_sidecar(path)
    except (OSError, ValueError):
        return False
    if (
        info.get("version") != FORMAT_VERSION
        or info.get("stain", "he") != stain
        or info.get("label") != label
        or info.get("seed") != _SAMPLE_SEED
        or info.get("size") != list(_SAMPLE_SIZE)
    ):
        return False
    if stain != "he" and info.get("ihc_settings") != IHC_SETTINGS:
        return False  # written by an older generator
    try:
        with tifffile.TiffFile(path) as tif:
            shape = tif.pages[0].shape
    except Exception:
        return False
    return tuple(shape[:2]) == (_SAMPLE_SIZE[1], _SAMPLE_SIZE[0])
