"""Deterministic synthetic whole-slide images: a "needle in a haystack" benchmark.

A synthetic slide is a pyramidal, JPEG-tiled RGB TIFF that looks, from afar, like an H&E
stained section: a near-white background, one to three tissue pieces with a pink stroma and
purple nuclei, and a few small lesions whose colour and nuclear pattern encode a class. The
lesions cover a tiny share of the tissue, so a slide-level classifier has to find them, which
is what attention-based multiple-instance learning is for.

Everything is a pure function of the arguments (seed included), so the same call writes
byte-identical files. Tiles are rendered procedurally, one at a time, at the scale of the
level being written, so memory stays bounded by a few tiles whatever the slide size.

A JSON sidecar next to the slide (``slide.tif`` -> ``slide.tif.json``) holds the ground
truth: label, tissue piece boxes, lesion boxes and classes. :func:`tissue_mask_truth`
renders the exact tissue mask with the same shape function as the renderer.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

__all__ = [
    "SYNTHETIC_CLASSES",
    "SyntheticSlide",
    "read_sidecar",
    "sample_slide",
    "sidecar_path",
    "tissue_mask_truth",
    "write_synthetic_slide",
]

SYNTHETIC_CLASSES: tuple[str, ...] = ("normal", "low-grade", "high-grade", "carcinoma")
"""Class names ordered by risk; index 0 is the lesion-free class."""

GENERATOR = "napari-slide-attention synthetic"
FORMAT_VERSION = 1

Box = tuple[int, int, int, int]

# Reduced levels stop once the largest side fits a thumbnail-sized image.
_TOP_LEVEL_MAX_SIDE = 1024
# Coarse grid used to place lesions: about this many pixels along the longest side.
_LAYOUT_GRID = 1024
# Lesions are meant to be needles: warn when they exceed this share of the tissue.
_MAX_LESION_FRACTION = 0.01
_BACKGROUND_LEVEL = 240

_SAMPLE_SIZE = (8192, 6144)
_SAMPLE_LABEL = "carcinoma"
_SAMPLE_SEED = 0


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
        )


# ----------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------


def write_synthetic_slide(
    path: str | os.PathLike[str],
    size: tuple[int, int] = _SAMPLE_SIZE,
    label: str | int = _SAMPLE_LABEL,
    seed: int = 0,
    *,
    tile_size: int = 256,
    mpp: float = 0.5,
    magnification: float = 20.0,
    n_pieces: int | None = None,
    n_lesions: int | None = None,
    lesion_size: int = 100,
    classes: Sequence[str] = SYNTHETIC_CLASSES,
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
        label: Slide class, as a name from ``classes`` or an index into it. Class 0 slides
            have no lesions; class ``k > 0`` slides have lesions of class ``k``.
        seed: Seed for the layout and textures; same arguments give identical files.
        tile_size: Tile width and height in pixels, a multiple of 16.
        mpp: Microns per pixel at level 0.
        magnification: Nominal objective magnification at level 0.
        n_pieces: Number of tissue pieces; default 1 to 3, chosen by the seed.
        n_lesions: Number of lesions of the label's class; default 2 to 4 chosen by the seed
            (0 for class 0).
        lesion_size: Approximate lesion side in level-0 pixels.
        classes: Class names ordered by risk, index 0 being lesion-free.
        quality: JPEG quality, 1 to 100.
        levels: Number of pyramid levels including level 0; default halves until the largest
            side is at most 1024 pixels.
        mixed: Also add one lesion of a lower, non-zero class (for labels of class 2 or
            higher), so the label is set by the highest-risk lesion rather than the only one.

    Returns:
        A description of what was written.

    Raises:
        ValueError: If an argument is out of range, or the lesions cannot be placed inside the
            tissue.
    """
    path = Path(path)
    classes = _check_classes(classes)
    width, height = _check_size(size)
    label_index = _check_label(label, classes)
    _check_int("seed", seed, minimum=0)
    # Larger tiles are unusual in slide files and would make the per-tile buffers large.
    _check_int("tile_size", tile_size, minimum=16, maximum=2048)
    if tile_size % 16:
        raise ValueError(f"tile_size must be a multiple of 16 (JPEG/TIFF tiles), got {tile_size}")
    _check_positive_float("mpp", mpp)
    _check_positive_float("magnification", magnification)
    _check_int("quality", quality, minimum=1, maximum=100)
    _check_int("lesion_size", lesion_size, minimum=8)
    if n_pieces is not None:
        _check_int("n_pieces", n_pieces, minimum=1, maximum=16)
    if n_lesions is not None:
        _check_int("n_lesions", n_lesions, minimum=0, maximum=64)
        if label_index == 0 and n_lesions:
            raise ValueError(
                f"n_lesions must be 0 for the lesion-free class {classes[0]!r}, got {n_lesions}"
            )
        if label_index > 0 and n_lesions == 0:
            raise ValueError(
                f"a slide labelled {classes[label_index]!r} needs at least one lesion "
                "(n_lesions=0 given)"
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

    layout = _make_layout(
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
    renderer = _Renderer(
        width, height, seed, tile_size, layout["pieces"], layout["lesions"], len(classes)
    )

    description = json.dumps(
        {
            "generator": GENERATOR,
            "version": FORMAT_VERSION,
            "mpp": [mpp, mpp],
            "magnification": magnification,
            "label": classes[label_index],
            "seed": seed,
        }
    )
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
                shape = _level_shape(width, height, level)
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

    stats = renderer.stats
    tissue_px = stats["tissue_px"]
    pieces_json = []
    for i, piece in enumerate(layout["pieces"]):
        x0, y0, x1, y1 = stats["piece_bounds"][i]
        pieces_json.append({"box": [x0, y0, x1 - x0 + 1, y1 - y0 + 1], "shape": piece})
    lesions_json = [
        {
            "class": classes[les["class_index"]],
            "class_index": les["class_index"],
            "box": list(les["box"]),
            "shape": {"noise_seed": les["noise_seed"]},
        }
        for les in layout["lesions"]
    ]
    info = {
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
        "lesions": lesions_json,
        "tissue_fraction": tissue_px / (width * height),
        "lesion_fraction": stats["lesion_px"] / tissue_px if tissue_px else 0.0,
    }
    side_tmp = side.with_name(f".{side.name}.{os.getpid()}.tmp")
    side_tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    os.replace(side_tmp, side)
    return SyntheticSlide.from_sidecar(path)


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
    if isinstance(info_or_path, SyntheticSlide):
        info: Mapping[str, Any] = read_sidecar(info_or_path.sidecar)
    elif isinstance(info_or_path, Mapping):
        info = info_or_path
    else:
        info = read_sidecar(info_or_path)
    _check_positive_float("downsample", downsample)
    width, height = (int(v) for v in info["size"])
    out_w = math.ceil(width / downsample)
    out_h = math.ceil(height / downsample)
    if region is None:
        rx, ry, rw, rh = 0, 0, out_w, out_h
    else:
        rx, ry, rw, rh = (int(v) for v in region)
        if rw <= 0 or rh <= 0 or rx < 0 or ry < 0:
            raise ValueError(f"region must have x, y >= 0 and w, h > 0, got {region}")
    pieces = [p["shape"] for p in info["pieces"]]
    return _tissue_mask(pieces, rx, ry, rw, rh, float(downsample))


def sample_slide(directory: str | os.PathLike[str] | None = None) -> Path:
    """Return the path of a demo slide, writing it on first use.

    The demo is an 8192 x 6144 px "carcinoma" slide (seed 0). An existing file is reused if
    its sidecar matches; a half-written one never is, since files are renamed into place.

    Args:
        directory: Where to keep it; default ``$XDG_CACHE_HOME/napari-slide-attention`` or
            ``~/.cache/napari-slide-attention``.

    Returns:
        The slide path.
    """
    if directory is None:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
        directory = Path(cache) / "napari-slide-attention"
    directory = Path(directory)
    width, height = _SAMPLE_SIZE
    path = directory / f"synthetic-{_SAMPLE_LABEL}-seed{_SAMPLE_SEED}-{width}x{height}.tif"
    if not _sample_is_valid(path):
        write_synthetic_slide(path, _SAMPLE_SIZE, _SAMPLE_LABEL, _SAMPLE_SEED)
    return path


# ----------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------


def _check_int(
    name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")


def _check_positive_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be positive and finite, got {value}")


def _check_size(size: Any) -> tuple[int, int]:
    try:
        width, height = size
    except (TypeError, ValueError):
        raise ValueError(f"size must be (width, height), got {size!r}") from None
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"size {name} must be an integer, got {value!r}")
        if value <= 0:
            raise ValueError(f"size {name} must be positive, got {value}")
        # Below this the tissue pieces are too small to be slide-like.
        if value < 64:
            raise ValueError(f"size {name} must be at least 64 px, got {value}")
    return int(width), int(height)


def _check_classes(classes: Any) -> tuple[str, ...]:
    if isinstance(classes, str):
        raise ValueError("classes must be a sequence of class names, not a string")
    classes = tuple(classes)
    if len(classes) < 2:
        raise ValueError(f"classes needs at least 2 names (normal first), got {classes!r}")
    if not all(isinstance(c, str) and c for c in classes):
        raise ValueError(f"classes must be non-empty strings, got {classes!r}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes must be unique, got {classes!r}")
    return classes


def _check_label(label: Any, classes: tuple[str, ...]) -> int:
    if isinstance(label, str):
        if label not in classes:
            raise ValueError(f"unknown label {label!r}; expected one of {list(classes)}")
        return classes.index(label)
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
        raise ValueError(f"label must be a class name or index, got {label!r}")
    if not 0 <= label < len(classes):
        raise ValueError(f"label index {label} out of range for {len(classes)} classes")
    return int(label)


def _level_count(width: int, height: int, levels: int | None) -> int:
    longest = max(width, height)
    if levels is None:
        n = 1
        while math.ceil(longest / 2 ** (n - 1)) > _TOP_LEVEL_MAX_SIDE:
            n += 1
        return n
    _check_int("levels", levels, minimum=1)
    if 2 ** (levels - 1) > longest:
        raise ValueError(
            f"levels={levels} is too many for a {width} x {height} slide "
            f"(at most {int(math.log2(longest)) + 1})"
        )
    return int(levels)


def _level_shape(width: int, height: int, level: int) -> tuple[int, int]:
    d = 2**level
    return -(-height // d), -(-width // d)


def _box(value: Sequence[Any]) -> Box:
    x, y, w, h = (int(v) for v in value)
    return x, y, w, h


def _slide_path(path: Path) -> Path:
    if path.suffix.lower() == ".json":
        return path.with_name(path.name[: -len(".json")])
    return path


def _sample_is_valid(path: Path) -> bool:
    try:
        info = read_sidecar(path)
    except (OSError, ValueError):
        return False
    if (
        info.get("version") != FORMAT_VERSION
        or info.get("label") != _SAMPLE_LABEL
        or info.get("seed") != _SAMPLE_SEED
        or info.get("size") != list(_SAMPLE_SIZE)
    ):
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            shape = tif.pages[0].shape
    except Exception:
        return False
    return tuple(shape[:2]) == (_SAMPLE_SIZE[1], _SAMPLE_SIZE[0])


# ----------------------------------------------------------------------------------------
# Procedural primitives
# ----------------------------------------------------------------------------------------

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xC2B2AE3D27D4EB4F)
_F1 = np.uint64(0xFF51AFD7ED558CCD)
_F2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
_S11 = np.uint64(11)


def _hash01(seed: int, ix: np.ndarray, iy: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) values hashed from integer lattice coordinates (broadcast).

    A stateless hash instead of a random generator, so any window of the lattice can be
    evaluated on its own and gives the same values whichever tile asks.
    """
    salt = np.uint64((seed * 0x165667B19E3779F9) & 0xFFFFFFFFFFFFFFFF)
    # Wrap-around multiplication is the point of the hash; numpy warns about it on scalars.
    with np.errstate(over="ignore"):
        h = np.atleast_1d(np.asarray(ix, dtype=np.int64)).astype(np.uint64) * _M1
        h = h ^ (np.asarray(iy, dtype=np.int64).astype(np.uint64) * _M2) ^ salt
        h ^= h >> _S33
        h *= _F1
        h ^= h >> _S33
        h *= _F2
        h ^= h >> _S33
    return (h >> _S11).astype(np.float64) * (1.0 / 2**53)


def _centres(start: int, n: int, downsample: float) -> np.ndarray:
    """Level-0 coordinates of the centres of output pixels ``start .. start + n - 1``.

    Shared by the renderer and :func:`tissue_mask_truth` so both evaluate the shape
    functions at bit-identical positions.
    """
    return (np.arange(start, start + n, dtype=np.float64) + 0.5) * downsample


def _smoothstep(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


def _value_noise(
    seed: int,
    xs: np.ndarray,
    ys: np.ndarray,
    sx: float,
    sy: float | None = None,
    dtype: type[np.floating[Any]] = np.float64,
) -> np.ndarray:
    """Smooth [0, 1) value noise on the grid ``ys x xs`` with lattice spacing ``sx, sy``.

    Interpolated separably with element-wise operations only: they give the same bits
    whatever the window, so the tissue-mask truth equals what the renderer drew (a matrix
    product would not promise that, and OpenBLAS threading made it slower too).
    """
    gx = xs / sx
    gy = ys / (sx if sy is None else sy)
    ix = np.floor(gx)
    iy = np.floor(gy)
    tx = _smoothstep(gx - ix).astype(dtype)
    ty = _smoothstep(gy - iy).astype(dtype)
    ix0, iy0 = int(ix[0]), int(iy[0])
    nx = int(ix[-1]) - ix0 + 2
    ny = int(iy[-1]) - iy0 + 2
    lat = _hash01(
        seed,
        np.arange(ix0, ix0 + nx)[None, :],
        np.arange(iy0, iy0 + ny)[:, None],
    ).astype(dtype)
    jx = (ix - ix0).astype(np.intp)
    jy = (iy - iy0).astype(np.intp)
    rows = lat[:, jx] * (1 - tx) + lat[:, jx + 1] * tx  # (ny, len(xs))
    return rows[jy] * (1 - ty)[:, None] + rows[jy + 1] * ty[:, None]


# ----------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------


def _piece_extent(piece: Mapping[str, Any]) -> tuple[float, float, float, float]:
    """Level-0 ``(x0, y0, x1, y1)`` outside which the piece's shape test is always False."""
    cx, cy = piece["center"]
    a, b = piece["axes"]
    th = piece["angle"]
    grow = 1.0 + piece["amplitude"]
    ex = grow * math.hypot(a * math.cos(th), b * math.sin(th))
    ey = grow * math.hypot(a * math.sin(th), b * math.cos(th))
    # A little slack so floating-point rounding at the rim can never clip the shape.
    return cx - ex - 2.0, cy - ey - 2.0, cx + ex + 2.0, cy + ey + 2.0


def _piece_inside(piece: Mapping[str, Any], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Tissue test of one piece on the grid ``ys x xs`` (level-0 coordinates).

    A rotated ellipse whose rim is pushed in and out by low-frequency noise, which gives
    smooth, irregular, blob-like sections.
    """
    cx, cy = piece["center"]
    a, b = piece["axes"]
    th = piece["angle"]
    c, s = math.cos(th), math.sin(th)
    dx = xs - cx
    dy = ys - cy
    u = (dx * (c / a))[None, :] + (dy * (s / a))[:, None]
    v = (dx * (-s / b))[None, :] + (dy * (c / b))[:, None]
    rho = np.sqrt(u * u + v * v)
    noise = _value_noise(piece["noise_seed"], xs, ys, piece["noise_scale"])
    return rho < 1.0 + piece["amplitude"] * (2.0 * noise - 1.0)


def _span(coords: np.ndarray, lo: float, hi: float) -> slice:
    return slice(
        int(np.searchsorted(coords, lo, side="left")),
        int(np.searchsorted(coords, hi, side="right")),
    )


def _tissue_mask(
    pieces: Sequence[Mapping[str, Any]], x: int, y: int, w: int, h: int, downsample: float
) -> np.ndarray:
    """Tissue mask of output pixels ``[y, y + h) x [x, x + w)`` at ``downsample``."""
    xs = _centres(x, w, downsample)
    mask = np.zeros((h, w), dtype=bool)
    # Row blocks keep the float64 temporaries small for large masks.
    block = max(1, 2**22 // max(w, 1))
    for r0 in range(0, h, block):
        ys = _centres(y + r0, min(block, h - r0), downsample)
        for piece in pieces:
            x0, y0, x1, y1 = _piece_extent(piece)
            sx, sy = _span(xs, x0, x1), _span(ys, y0, y1)
            if sx.start >= sx.stop or sy.start >= sy.stop:
                continue
            sub = _piece_inside(piece, xs[sx], ys[sy])
            mask[r0 + sy.start : r0 + sy.stop, sx] |= sub
    return mask


def _lesion_inside(lesion: Mapping[str, Any], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Lesion test on the grid ``ys x xs``: a noisy disc inscribed in the lesion box."""
    bx, by, bw, bh = lesion["box"]
    u = (xs - (bx + bw / 2.0)) / (bw / 2.0)
    v = (ys - (by + bh / 2.0)) / (bh / 2.0)
    rho2 = u[None, :] ** 2 + v[:, None] ** 2
    noise = _value_noise(lesion["noise_seed"], xs, ys, max(bw, bh) / 2.5)
    limit = 1.0 - 0.3 * noise
    return rho2 < limit * limit


# ----------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------


def _make_layout(
    width: int,
    height: int,
    seed: int,
    *,
    label_index: int,
    n_classes: int,
    n_pieces: int | None,
    n_lesions: int | None,
    lesion_size: int,
    mixed: bool,
) -> dict[str, list[dict[str, Any]]]:
    """Choose tissue pieces and lesion positions from the seed."""
    rng = np.random.default_rng(seed)
    if n_pieces is None:
        n_pieces = int(rng.integers(1, 4))
    if n_lesions is None:
        n_lesions = 0 if label_index == 0 else int(rng.integers(2, 5))

    # One cell per piece along the long side, so pieces never touch: each stays inside its
    # cell minus a margin, with background in between.
    horizontal = width >= height
    long_side = width if horizontal else height
    cell_len = long_side / n_pieces
    pieces = []
    for k in range(n_pieces):
        if horizontal:
            cw, ch = cell_len, float(height)
            ccx, ccy = (k + 0.5) * cell_len, height / 2.0
        else:
            cw, ch = float(width), cell_len
            ccx, ccy = width / 2.0, (k + 0.5) * cell_len
        amp = 0.12 + 0.1 * rng.random()
        # Elongated cells get elongated pieces, or the pieces would be tiny.
        aspect = min(cw, ch) / max(cw, ch)
        lo = max(0.25, min(0.55, aspect))
        hi = max(lo + 0.1, min(0.9, aspect + 0.35))
        ratio = lo + (hi - lo) * rng.random()
        if cw > 1.15 * ch:
            angle = rng.uniform(-0.3, 0.3)
        elif ch > 1.15 * cw:
            angle = math.pi / 2 + rng.uniform(-0.3, 0.3)
        else:
            angle = rng.uniform(0.0, math.pi)
        a, b = 1.0, ratio
        ex = math.hypot(a * math.cos(angle), b * math.sin(angle))
        ey = math.hypot(a * math.sin(angle), b * math.cos(angle))
        avail_x = cw / 2.0 * 0.88 / (1.0 + amp)
        avail_y = ch / 2.0 * 0.88 / (1.0 + amp)
        scale = min(avail_x / ex, avail_y / ey) * (0.7 + 0.3 * rng.random())
        slack_x = max(0.0, avail_x - scale * ex) * (1.0 + amp)
        slack_y = max(0.0, avail_y - scale * ey) * (1.0 + amp)
        pieces.append(
            {
                "center": [
                    float(ccx + rng.uniform(-slack_x, slack_x)),
                    float(ccy + rng.uniform(-slack_y, slack_y)),
                ],
                "axes": [float(a * scale), float(b * scale)],
                "angle": float(angle),
                "amplitude": float(amp),
                "noise_scale": float(0.45 * b * scale),
                "noise_seed": int(rng.integers(2**31)),
                "stain": float(0.97 + 0.06 * rng.random()),
            }
        )

    lesion_classes = [label_index] * n_lesions
    if mixed and label_index >= 2:
        lesion_classes.append(int(rng.integers(1, label_index)))
    lesions = _place_lesions(width, height, pieces, lesion_classes, lesion_size, rng)
    return {"pieces": pieces, "lesions": lesions}


def _place_lesions(
    width: int,
    height: int,
    pieces: list[dict[str, Any]],
    lesion_classes: list[int],
    lesion_size: int,
    rng: np.random.Generator,
) -> list[dict[str, Any]]:
    if not lesion_classes:
        return []
    from scipy import ndimage  # only needed here; keeps module import light

    d = max(1.0, math.ceil(max(width, height) / _LAYOUT_GRID))
    grid_w, grid_h = math.ceil(width / d), math.ceil(height / d)
    coarse = _tissue_mask(pieces, 0, 0, grid_w, grid_h, d)
    tissue_area = float(coarse.sum()) * d * d
    side_max = math.ceil(lesion_size * 1.15)
    total = len(lesion_classes) * side_max * side_max
    if tissue_area == 0 or total > tissue_area * 0.5:
        raise ValueError(
            f"lesion_size={lesion_size} is too large for the tissue of a {width} x {height} "
            f"slide ({len(lesion_classes)} lesions of up to {side_max}^2 px vs about "
            f"{tissue_area:.0f} px^2 of tissue)"
        )
    # Expected lesion area: discs inscribed in the boxes, about pi/4 of them.
    fraction = len(lesion_classes) * lesion_size**2 * (math.pi / 4) / tissue_area
    if fraction > _MAX_LESION_FRACTION:
        warnings.warn(
            f"lesions cover about {fraction:.1%} of the tissue (more than "
            f"{_MAX_LESION_FRACTION:.0%}); use a larger slide or a smaller lesion_size for a "
            "needle-in-a-haystack task",
            UserWarning,
            stacklevel=4,
        )
    # Candidates: coarse pixels far enough from the tissue rim for the whole box; the exact
    # level-0 check below is what guarantees it.
    dist = ndimage.distance_transform_edt(np.pad(coarse, 1))[1:-1, 1:-1] * d
    cand = np.flatnonzero(dist >= side_max * 0.75 + 2 * d)
    if cand.size == 0:
        raise ValueError(
            f"lesion_size={lesion_size} does not fit inside any tissue piece of a "
            f"{width} x {height} slide"
        )
    lesions: list[dict[str, Any]] = []
    gap = lesion_size / 2.0
    for cls in lesion_classes:
        for _ in range(500):
            w = round(lesion_size * rng.uniform(0.85, 1.15))
            h = round(lesion_size * rng.uniform(0.85, 1.15))
            idx = int(cand[rng.integers(cand.size)])
            gy, gx = divmod(idx, grid_w)
            cx = (gx + rng.random()) * d
            cy = (gy + rng.random()) * d
            x, y = round(cx - w / 2), round(cy - h / 2)
            if x < 0 or y < 0 or x + w > width or y + h > height:
                continue
            if any(
                x < bx + bw + gap and bx < x + w + gap and y < by + bh + gap and by < y + h + gap
                for bx, by, bw, bh in (les["box"] for les in lesions)
            ):
                continue
            if not _tissue_mask(pieces, x, y, w, h, 1.0).all():
                continue
            lesions.append(
                {"class_index": cls, "box": [x, y, w, h], "noise_seed": int(rng.integers(2**31))}
            )
            break
        else:
            raise ValueError(
                f"could not place {len(lesion_classes)} non-overlapping lesions of "
                f"lesion_size={lesion_size} inside the tissue of a {width} x {height} slide"
            )
    return lesions


# ----------------------------------------------------------------------------------------
# Textures and rendering
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Texture:
    """H&E-like look of one class: stroma colour plus a jittered lattice of nuclei."""

    stroma: tuple[float, float, float]
    nucleus: tuple[float, float, float]
    cell: float  # lattice spacing, level-0 px: one nucleus at most per cell
    density: float  # probability that a cell holds a nucleus
    radius: float  # mean nucleus radius, level-0 px
    pleomorphism: float  # relative radius spread
    elongation: float  # maximum extra axis ratio

    @property
    def coverage(self) -> float:
        """Expected share of pixels covered by nuclei (ellipse area is pi r^2)."""
        r2 = self.radius**2 * (1.0 + self.pleomorphism**2 / 3.0)
        return self.density * math.pi * r2 / self.cell**2


def _texture(class_index: int, n_classes: int) -> _Texture:
    """Texture of a class: risk ``t`` in [0, 1] moves every feature monotonically.

    Higher risk means bluer, darker stroma; denser, larger, more variable and darker nuclei,
    so every class has its own mean colour and nuclear pattern.
    """
    t = class_index / (n_classes - 1)

    def lerp(p: tuple[float, ...], q: tuple[float, ...]) -> tuple[float, float, float]:
        r, g, b = (pi + (qi - pi) * t for pi, qi in zip(p, q, strict=True))
        return r, g, b

    return _Texture(
        stroma=lerp((236.0, 168.0, 200.0), (176.0, 118.0, 186.0)),
        nucleus=lerp((112.0, 62.0, 150.0), (42.0, 18.0, 84.0)),
        cell=16.0 - 6.0 * t,
        density=0.35 + 0.6 * t,
        radius=2.8 + 1.4 * t,
        pleomorphism=0.12 + 0.3 * t,
        elongation=0.25 + 0.35 * t,
    )


class _Renderer:
    """Renders tiles of any pyramid level from the layout, one at a time."""

    def __init__(
        self,
        width: int,
        height: int,
        seed: int,
        tile_size: int,
        pieces: list[dict[str, Any]],
        lesions: list[dict[str, Any]],
        n_classes: int,
    ) -> None:
        self.width = width
        self.height = height
        self.seed = seed
        self.ts = tile_size
        self.pieces = pieces
        self.lesions = lesions
        self.textures = [_texture(k, n_classes) for k in range(n_classes)]
        self.piece_extents = [_piece_extent(p) for p in pieces]
        self.stats: dict[str, Any] = {
            "tissue_px": 0,
            "lesion_px": 0,
            "piece_bounds": [[width, height, -1, -1] for _ in pieces],
        }
        # A small bank of grain tiles: per-pixel noise is too slow to draw per tile and
        # repeating grain of +-2 grey levels is invisible.
        rng = np.random.default_rng([seed, 0x5EED])
        # About 15 bytes per pixel per bank entry; stay within ~64 MB.
        n_bank = max(1, min(8, 2**26 // (15 * tile_size * tile_size)))
        grain = rng.integers(-2, 3, size=(n_bank, tile_size, tile_size, 1), dtype=np.int16)
        chroma = rng.integers(-1, 2, size=(n_bank, tile_size, tile_size, 3), dtype=np.int16)
        # Background tiles are only read, never modified, so the bank can be yielded as is.
        self.background = (_BACKGROUND_LEVEL + grain + chroma).astype(np.uint8)
        # Tissue gets a stronger grain than the glass.
        self.tissue_base = (255 + 2 * grain + chroma).astype(np.float32)
        self.stain = np.asarray([p["stain"] for p in pieces] + [1.0], dtype=np.float32)

    def tiles(self, level: int) -> Iterator[np.ndarray]:
        """Yield the tiles of ``level`` in row-major order, each ``(ts, ts, 3)`` uint8."""
        rows, cols = _level_shape(self.width, self.height, level)
        ts = self.ts
        for ty in range(-(-rows // ts)):
            for tx in range(-(-cols // ts)):
                yield self._tile(level, tx * ts, ty * ts, rows, cols)

    def _bank(self, level: int, x0: int, y0: int) -> int:
        h = _hash01(self.seed ^ 0x6A1, np.array([x0 + 7919 * level]), np.array([y0]))
        return int(h[0] * self.background.shape[0])

    def _tile(self, level: int, x0: int, y0: int, rows: int, cols: int) -> np.ndarray:
        ts = self.ts
        d = float(2**level)
        bank = self._bank(level, x0, y0)
        xs = _centres(x0, ts, d)
        ys = _centres(y0, ts, d)

        tissue = np.zeros((ts, ts), dtype=bool)
        piece_id = None
        for i, (piece, ext) in enumerate(zip(self.pieces, self.piece_extents, strict=True)):
            sx, sy = _span(xs, ext[0], ext[2]), _span(ys, ext[1], ext[3])
            if sx.start >= sx.stop or sy.start >= sy.stop:
                continue
            sub = _piece_inside(piece, xs[sx], ys[sy])
            if not sub.any():
                continue
            tissue[sy, sx] |= sub
            if piece_id is None:
                piece_id = np.full((ts, ts), -1, dtype=np.int8)
            piece_id[sy, sx][sub] = i
            if level == 0:
                self._track_piece(i, sub, x0 + sx.start, y0 + sy.start, rows, cols)

        background = self.background[bank]
        if piece_id is None:
            return background

        classes = np.zeros((ts, ts), dtype=np.int8)
        present = set()
        for les in self.lesions:
            bx, by, bw, bh = les["box"]
            sx, sy = _span(xs, bx, bx + bw), _span(ys, by, by + bh)
            if sx.start >= sx.stop or sy.start >= sy.stop:
                continue
            sub = _lesion_inside(les, xs[sx], ys[sy])
            classes[sy, sx][sub] = les["class_index"]
            present.add(les["class_index"])
            if level == 0:
                valid = sub[: max(0, rows - y0 - sy.start), : max(0, cols - x0 - sx.start)]
                self.stats["lesion_px"] += int(valid.sum())
        if level == 0:
            self.stats["tissue_px"] += int(tissue[: rows - y0, : cols - x0].sum())

        # Everything is composed as "darkness" (255 - rgb), which is linear in the stain
        # amounts, so the stain strength of each piece is one multiplication.
        dark = self._darkness(0, xs, ys, d)
        for k in sorted(present):
            dark = np.where((classes == k)[:, :, None], self._darkness(k, xs, ys, d), dark)
        # Per-piece stain strength: sections of one slide are rarely stained identically.
        dark *= self.stain[piece_id][:, :, None]
        out = np.subtract(self.tissue_base[bank], dark, out=dark)
        np.clip(out, 0, 255, out=out)
        return np.where(tissue[:, :, None], out.astype(np.uint8), background)

    def _track_piece(self, i: int, sub: np.ndarray, x0: int, y0: int, rows: int, cols: int) -> None:
        sub = sub[: max(0, rows - y0), : max(0, cols - x0)]
        cols_any = np.flatnonzero(sub.any(axis=0))
        rows_any = np.flatnonzero(sub.any(axis=1))
        if cols_any.size == 0:
            return
        b = self.stats["piece_bounds"][i]
        b[0] = min(b[0], x0 + int(cols_any[0]))
        b[1] = min(b[1], y0 + int(rows_any[0]))
        b[2] = max(b[2], x0 + int(cols_any[-1]))
        b[3] = max(b[3], y0 + int(rows_any[-1]))

    def _darkness(self, k: int, xs: np.ndarray, ys: np.ndarray, d: float) -> np.ndarray:
        """``255 - rgb`` (float32) of class ``k``'s texture at level-0 positions ``ys x xs``."""
        tex = self.textures[k]
        seed = self.seed * 131 + k
        # Stroma: broad eosin variation plus fibre-like streaks; an octave finer than two
        # output pixels would only alias, so it is left out (its mean is zero).
        shade = np.ones((ys.size, xs.size), dtype=np.float32)
        for sx, sy, amp, s in ((180.0, 180.0, 0.06, 1), (70.0, 14.0, 0.05, 2)):
            if min(sx, sy) / d >= 2.0:
                noise = _value_noise(seed * 7 + s, xs, ys, sx, sy, np.float32)
                shade += np.float32(2 * amp) * noise - np.float32(amp)

        # Nuclei drawn sharply at full resolution, fading to their mean coverage by a
        # downsample of 4 where they are smaller than a pixel.
        fade = min(1.0, (d - 1.0) / 3.0)
        alpha: np.ndarray | np.float32 = np.float32(tex.coverage * fade)
        if fade < 1.0:
            alpha = alpha + np.float32(1.0 - fade) * self._nuclei(tex, seed, xs, ys, d)
        stroma = 255.0 - np.asarray(tex.stroma, dtype=np.float32)
        nucleus = 255.0 - np.asarray(tex.nucleus, dtype=np.float32)
        dark = (shade * (1 - alpha))[:, :, None] * stroma
        dark += alpha[:, :, None] * nucleus if fade < 1.0 else alpha * nucleus
        return dark

    @staticmethod
    def _nuclei(tex: _Texture, seed: int, xs: np.ndarray, ys: np.ndarray, d: float) -> np.ndarray:
        """Nuclear coverage in [0, 1]: at most one jittered elliptical nucleus per cell."""
        c = tex.cell
        cx = np.floor(xs / c)
        cy = np.floor(ys / c)
        cx0, cy0 = int(cx[0]), int(cy[0])
        ncx, ncy = int(cx[-1]) - cx0 + 1, int(cy[-1]) - cy0 + 1
        gx = np.arange(cx0, cx0 + ncx)[None, :]
        gy = np.arange(cy0, cy0 + ncy)[:, None]

        def u(stream: int) -> np.ndarray:
            return _hash01(seed * 16 + stream, gx, gy)

        radius = tex.radius * (1.0 + tex.pleomorphism * (2.0 * u(1) - 1.0))
        elong = 1.0 + tex.elongation * u(2)
        ra, rb = radius * np.sqrt(elong), radius / np.sqrt(elong)
        # Keep each nucleus inside its own cell so a pixel only has to look at one cell.
        slack = np.maximum(0.0, c / 2.0 - ra - 0.5)
        ox = c / 2.0 + slack * (2.0 * u(3) - 1.0)
        oy = c / 2.0 + slack * (2.0 * u(4) - 1.0)
        phi = math.pi * u(5)
        present = u(6) < tex.density
        cos, sin = np.cos(phi), np.sin(phi)
        # Absent nuclei get a huge inverse radius, so their coverage clips to zero.
        inv_a = np.where(present, 1.0 / ra, 1e3)
        inv_b = np.where(present, 1.0 / rb, 1e3)
        coef = [
            (cos * inv_a).astype(np.float32).ravel(),
            (sin * inv_a).astype(np.float32).ravel(),
            (-sin * inv_b).astype(np.float32).ravel(),
            (cos * inv_b).astype(np.float32).ravel(),
        ]
        flat = (cy - cy0).astype(np.intp)[:, None] * ncx + (cx - cx0).astype(np.intp)[None, :]
        fx = (xs - cx * c).astype(np.float32)[None, :]
        fy = (ys - cy * c).astype(np.float32)[:, None]
        dx = fx - ox.astype(np.float32).ravel()[flat]
        dy = fy - oy.astype(np.float32).ravel()[flat]
        p = dx * coef[0][flat] + dy * coef[1][flat]
        q = dx * coef[2][flat] + dy * coef[3][flat]
        dist = np.sqrt(p * p + q * q)
        # Anti-aliased rim about one output pixel wide.
        return np.clip((1.0 - dist) * np.float32(tex.radius / d) + 0.5, 0.0, 1.0)
