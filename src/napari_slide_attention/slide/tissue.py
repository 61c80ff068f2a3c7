"""Tissue detection and tiling on a low-resolution copy of a whole-slide image.

The tissue mask is computed once per slide on a coarse level (about 8 µm per mask pixel by
default), where a slide of several centimetres is a few thousand pixels on a side, so detection
costs well under a second. Everything downstream (tissue pieces, tile grids) works in level-0
pixel coordinates, converted through the mask's ``downsample`` (level-0 px per mask px).

Pipeline of :func:`tissue_mask_from_rgb`:

1. Features per pixel: HSV saturation (stained tissue is coloured, glass is grey) and/or the
   optical density sum ``-log10(I / I0)`` over the channels (pale IHC tissue with a weak
   hematoxylin counterstain is barely coloured but still absorbs light).
2. Otsu threshold of each feature, capped a few noise widths above the glass (Otsu alone
   falls between pale and strongly stained tissue when a slide holds both) and never below a
   floor (on a blank slide Otsu would split the glass noise into "tissue" and "background").
3. Pure white (glass, lamp glare) and near-black (pen ink, dark out-of-focus borders, scanner
   padding) pixels are excluded.
4. Morphological closing then opening, filling of holes up to a size (real lumina and vessels
   above it stay open), removal of small pieces (dust, debris).

Brightfield is assumed: tissue is darker and more coloured than the background. Fluorescence
slides (dark background) are not supported.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

import dask.array as da
import numpy as np
from skimage import filters, measure, morphology

from .boxes import Box
from .reader import MAX_MPP, MIN_MPP

__all__ = [
    "SlideLike",
    "TileGrid",
    "TissueMask",
    "TissueParams",
    "TissuePiece",
    "tile_grid",
    "tissue_mask",
    "tissue_mask_from_rgb",
    "tissue_pieces",
]

_METHODS = ("auto", "saturation", "od")
# Intensities are clipped to this before the log of the optical density: a black pixel would
# otherwise give an infinite OD (1/255 is the darkest non-zero 8-bit value).
_MIN_INTENSITY = 1.0 / 255.0
# Tissue fractions are sums of floats: a tile exactly at ``min_tissue`` must not fall below it
# by rounding.
_FRACTION_EPS = 1e-9


class SlideLike(Protocol):
    """What :func:`tissue_mask` needs from a slide (``slide.reader.Slide`` provides it)."""

    levels: list[Any]  # dask arrays, level 0 first: (H, W, 3) RGB or (H, W) grey
    level_info: list[Any]  # .shape (h, w), .downsample (level-0 px per level px)
    mpp: tuple[float, float] | None
    rgb: bool

    def level_for(self, mpp: float | None = None, downsample: float | None = None) -> int: ...


MIN_MASK_MPP = 1.0
MAX_FILTER_UM = 1000.0


@dataclass(frozen=True)
class TissueParams:
    """Parameters of tissue detection; the defaults suit H&E and IHC scanned at 20x or 40x.

    Lengths and areas are physical (µm, µm²) so that the same parameters work at any
    scan resolution. When the slide's pixel size is unknown they are converted with
    ``assumed_mpp``.

    Attributes:
        method: ``"saturation"`` (Otsu on HSV saturation; good for H&E), ``"od"`` (Otsu on the
            optical density sum; good for pale IHC/DAB with a hematoxylin counterstain, and
            the only method for grey images) or ``"auto"`` (tissue where either feature is
            above its threshold; grey images use OD only).
        mask_mpp: Target mask resolution in µm per mask pixel, used when the slide's mpp is
            known.
        mask_downsample: Target level-0 px per mask px, used when the slide's mpp is unknown.
        max_mask_side: Longest side allowed for the mask in px; a coarser resolution is used
            for larger slides so that detection stays cheap.
        assumed_mpp: Level-0 µm per px assumed when the slide's mpp is unknown (0.5 is a
            typical 20x scan); only converts the µm parameters below to pixels.
        glass_sigmas: Cap of the thresholds: at most this many noise standard deviations
            above the glass, estimated as the median and MAD of the pixels below the Otsu
            threshold. With pale and strongly stained tissue on one slide, Otsu alone splits
            the tissue instead of tissue from glass. None disables the cap (plain Otsu).
        min_saturation: Floor of the saturation threshold, in [0, 1].
        min_od: Floor of the threshold on the optical density sum over the 3 channels
            (log10, full-scale white as I0); 0.15 is a uniform grey of about 226/255.
        white_level: Pixels whose darkest channel is at least this (fraction of full scale)
            are glass, never tissue.
        black_level: Pixels whose brightest channel is at most this (fraction of full scale)
            are pen ink or black borders, never tissue.
        smooth_sigma_um: Gaussian smoothing of the features before thresholding, so the
            texture of nuclei and stroma does not fragment the mask; 0 disables.
        closing_radius_um: Radius of the morphological closing (bridges small gaps); 0
            disables.
        opening_radius_um: Radius of the opening that follows (removes threads and specks);
            0 disables.
        fill_holes: Whether to fill holes in the tissue.
        max_hole_area_um2: Holes up to this area are filled; larger ones (lumina, vessels,
            tears) are kept as background.
        min_piece_area_um2: Connected pieces smaller than this are dropped (0.05 mm² default).
    """

    method: str = "auto"
    mask_mpp: float = 8.0
    mask_downsample: float = 32.0
    max_mask_side: int = 4096
    assumed_mpp: float = 0.5
    glass_sigmas: float | None = 6.0
    min_saturation: float = 0.05
    min_od: float = 0.15
    white_level: float = 0.92
    black_level: float = 0.2
    smooth_sigma_um: float = 8.0
    closing_radius_um: float = 16.0
    opening_radius_um: float = 8.0
    fill_holes: bool = True
    max_hole_area_um2: float = 10_000.0
    min_piece_area_um2: float = 50_000.0

    def changed(self) -> dict[str, Any]:
        """The parameters that differ from the defaults, by name (what another process
        needs to detect the same tissue: ``--tissue NAME=VALUE`` each)."""
        default = TissueParams()
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        }

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {self.method!r}")
        for name in ("mask_mpp", "assumed_mpp"):
            _check_positive(name, getattr(self, name))
        # Bounds on what sets the mask's cost: a mask finer than 1 µm/px, or larger than
        # 16384 px, or filters wider than a millimetre take minutes and find no more
        # tissue than the defaults (--mask-mpp 1e-6 ran for minutes before this check).
        if self.mask_mpp < MIN_MASK_MPP:
            raise ValueError(
                f"mask_mpp must be at least {MIN_MASK_MPP:g} µm/px (a finer tissue mask costs "
                f"minutes and finds no more tissue), got {self.mask_mpp:g}"
            )
        if not MIN_MPP <= self.assumed_mpp <= MAX_MPP:
            raise ValueError(
                f"assumed_mpp must be a microscope's pixel size, {MIN_MPP:g} to {MAX_MPP:g} "
                f"µm/px, got {self.assumed_mpp:g}"
            )
        if not (math.isfinite(self.mask_downsample) and self.mask_downsample >= 1):
            raise ValueError(f"mask_downsample must be >= 1, got {self.mask_downsample}")
        if not (int(self.max_mask_side) == self.max_mask_side and 1 <= self.max_mask_side <= 16384):
            raise ValueError(
                f"max_mask_side must be an integer from 1 to 16384, got {self.max_mask_side}"
            )
        if self.glass_sigmas is not None and not (
            math.isfinite(self.glass_sigmas) and self.glass_sigmas >= 0
        ):
            raise ValueError(f"glass_sigmas must be None or >= 0, got {self.glass_sigmas}")
        for name in (
            "smooth_sigma_um",
            "closing_radius_um",
            "opening_radius_um",
            "max_hole_area_um2",
            "min_piece_area_um2",
            "min_od",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        for name in ("smooth_sigma_um", "closing_radius_um", "opening_radius_um"):
            value = getattr(self, name)
            if value > MAX_FILTER_UM:
                raise ValueError(
                    f"{name} must be at most {MAX_FILTER_UM:g} µm (a filter wider than a "
                    f"millimetre blurs whole tissue pieces together), got {value:g}"
                )
        for name in ("min_saturation", "white_level", "black_level"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.black_level >= self.white_level:
            raise ValueError(
                f"black_level ({self.black_level}) must be below white_level ({self.white_level})"
            )


@dataclass(eq=False)
class TissueMask:
    """A boolean tissue mask of a slide and how it maps to level-0 pixels.

    Attributes:
        mask: (h, w) bool, True on tissue.
        downsample: Level-0 px per mask px (the same on both axes).
        level: The slide level the mask was computed from (None when not from a slide).
        params: The parameters used.
        mpp: Level-0 (x, y) µm per px of the slide, None if unknown.
        slide_shape: Level-0 (height, width) of the slide; None means the mask's own extent,
            ``mask.shape * downsample``.
    """

    mask: np.ndarray  # (h, w) bool
    downsample: float
    level: int | None = None
    params: TissueParams = field(default_factory=TissueParams)
    mpp: tuple[float, float] | None = None
    slide_shape: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        self.mask = np.asarray(self.mask, dtype=bool)
        if self.mask.ndim != 2:
            raise ValueError(f"mask must be 2-D (h, w), got shape {self.mask.shape}")
        _check_positive("downsample", self.downsample)
        self.downsample = float(self.downsample)
        if self.mpp is not None:
            self.mpp = _mpp_pair(self.mpp)
        if self.slide_shape is not None:
            self.slide_shape = (int(self.slide_shape[0]), int(self.slide_shape[1]))

    @property
    def shape(self) -> tuple[int, int]:
        """(h, w) of the mask in mask px."""
        return self.mask.shape  # type: ignore[return-value]

    @property
    def level0_shape(self) -> tuple[int, int]:
        """Level-0 (height, width) the mask covers: ``slide_shape`` or the mask's own extent."""
        if self.slide_shape is not None:
            return self.slide_shape
        h, w = self.mask.shape
        return round(h * self.downsample), round(w * self.downsample)

    @property
    def fraction(self) -> float:
        """Share of the mask's pixels that are tissue, in [0, 1] (0 for an empty mask)."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def to_level0_box(self, x: float, y: float, w: float, h: float) -> Box:
        """Converts a box in mask px to level-0 px.

        Args:
            x: Left edge in mask px.
            y: Top edge in mask px.
            w: Width in mask px.
            h: Height in mask px.

        Returns:
            (x, y, w, h) in integer level-0 px, snapped outward (the box covers every level-0
            pixel the mask box touches) and clipped to ``level0_shape``.
        """
        height, width = self.level0_shape
        ds = self.downsample
        x0 = min(max(math.floor(x * ds), 0), width)
        y0 = min(max(math.floor(y * ds), 0), height)
        # The tolerance keeps an exact product (10 * 3.2 = 32.000000000000004) from rounding up.
        x1 = min(max(math.ceil((x + w) * ds - 1e-9), x0), width)
        y1 = min(max(math.ceil((y + h) * ds - 1e-9), y0), height)
        return x0, y0, x1 - x0, y1 - y0

    def resize_to(self, shape: Sequence[int], downsample: float | None = None) -> np.ndarray:
        """Resamples the mask (nearest neighbour), e.g. to overlay it on another level.

        Args:
            shape: (h, w) of the output.
            downsample: Level-0 px per output px. When given, output pixels are placed by
                their level-0 position (pixels beyond the mask are False), which is exact for
                a pyramid level whose size was rounded; when None, the mask is stretched to
                ``shape``.

        Returns:
            (h, w) bool array.
        """
        out_h, out_w = (int(s) for s in shape)
        if out_h < 0 or out_w < 0:
            raise ValueError(f"shape must be non-negative, got {tuple(shape)}")
        h, w = self.mask.shape
        if downsample is None:
            scale_y = h / out_h if out_h else 1.0
            scale_x = w / out_w if out_w else 1.0
        else:
            _check_positive("downsample", downsample)
            scale_y = scale_x = downsample / self.downsample
        # Centre of each output pixel, in mask px.
        rows = np.floor((np.arange(out_h) + 0.5) * scale_y).astype(np.int64)
        cols = np.floor((np.arange(out_w) + 0.5) * scale_x).astype(np.int64)
        out = np.zeros((out_h, out_w), dtype=bool)
        keep_r, keep_c = rows < h, cols < w
        out[np.ix_(keep_r, keep_c)] = self.mask[np.ix_(rows[keep_r], cols[keep_c])]
        return out

    def select(self, piece: TissuePiece) -> TissueMask:
        """A copy of this mask with only ``piece`` kept (e.g. to tile one piece on its own)."""
        mask = np.zeros_like(self.mask)
        x, y, w, h = piece.mask_box
        mask[y : y + h, x : x + w] = piece.mask
        return replace(self, mask=mask)


@dataclass(eq=False)
class TissuePiece:
    """One connected piece of tissue (a slide often holds several sections or cores).

    Attributes:
        label: 1-based rank of the piece, largest first.
        box: Level-0 (x, y, w, h) bounding box, snapped outward to level-0 px.
        area_px: Area in level-0 px² (mask pixels times ``downsample**2``).
        area_um2: Area in µm² (through ``params.assumed_mpp`` if the mpp is unknown).
        mask: (bh, bw) bool crop of the tissue mask over the piece's box, in mask px; True
            only on this piece (not on other pieces reaching into its box).
        mask_box: (x, y, w, h) of ``mask`` inside ``TissueMask.mask``, in mask px.
    """

    label: int
    box: Box
    area_px: float
    area_um2: float
    mask: np.ndarray  # (bh, bw) bool
    mask_box: Box


@dataclass(eq=False)
class TileGrid:
    """Square tiles on the slide-wide lattice, with the tissue fraction of each.

    All grids lie on one lattice anchored at the slide's (0, 0): tile (r, c) of a grid covers
    level-0 ``[origin + (c, r) * tile_size, + tile_size)``, and ``origin`` is a multiple of
    ``tile_size``. Grids of different pieces and of the whole slide therefore share cells.
    Only tiles lying fully inside the slide are part of a grid.

    Attributes:
        tile_size: Tile side in level-0 px.
        origin: Level-0 (x0, y0) of the grid's top-left corner.
        shape: (rows, cols) of the grid.
        tissue_fraction: (rows, cols) float share of each tile covered by tissue, in [0, 1].
        min_tissue: Tissue fraction a tile needs to be kept.
        in_tissue: (rows, cols) bool, ``tissue_fraction >= min_tissue``.
    """

    tile_size: int
    origin: tuple[int, int]
    shape: tuple[int, int]
    tissue_fraction: np.ndarray  # (rows, cols) float64
    min_tissue: float
    in_tissue: np.ndarray  # (rows, cols) bool

    def __len__(self) -> int:
        return int(np.count_nonzero(self.in_tissue))

    @property
    def lattice_offset(self) -> tuple[int, int]:
        """(row, col) of this grid's top-left tile on the slide-wide lattice."""
        return self.origin[1] // self.tile_size, self.origin[0] // self.tile_size

    def indices(self, lattice: bool = False) -> np.ndarray:
        """(n, 2) int64 (row, col) of the in-tissue tiles, row-major order.

        Args:
            lattice: Give slide-wide lattice indices instead of indices within this grid.
        """
        idx = np.argwhere(self.in_tissue).astype(np.int64)  # (n, 2) row-major
        if lattice:
            idx += np.asarray(self.lattice_offset, dtype=np.int64)
        return idx

    def coords(self) -> np.ndarray:
        """(n, 2) int64 level-0 (x, y) top-left corners of the in-tissue tiles, row-major."""
        idx = self.indices(lattice=True)
        return idx[:, ::-1] * self.tile_size

    def boxes(self) -> np.ndarray:
        """(n, 4) int64 level-0 (x, y, w, h) of the in-tissue tiles, row-major."""
        xy = self.coords()
        wh = np.full_like(xy, self.tile_size)
        return np.concatenate([xy, wh], axis=1)

    def fractions(self) -> np.ndarray:
        """(n,) tissue fraction of the in-tissue tiles, row-major."""
        return self.tissue_fraction[self.in_tissue]


# ----------------------------------------------------------------------------------------------
# Tissue mask


def tissue_mask_from_rgb(
    rgb: np.ndarray,
    downsample: float,
    params: TissueParams | None = None,
    mpp: float | Sequence[float] | None = None,
    *,
    level: int | None = None,
    slide_shape: Sequence[int] | None = None,
) -> TissueMask:
    """Detects tissue in a low-resolution brightfield image (the numpy core).

    Args:
        rgb: (h, w, 3) RGB, (h, w, 4) RGBA (alpha ignored) or (h, w) grey image; unsigned
            integers over their full range or floats in [0, 1].
        downsample: Level-0 px per image px.
        params: Detection parameters (defaults when None).
        mpp: Level-0 µm per px, one value or (x, y); None if unknown (then
            ``params.assumed_mpp``).
        level: Slide level the image comes from, recorded in the result.
        slide_shape: Level-0 (height, width) of the slide, recorded in the result.

    Returns:
        The tissue mask, same (h, w) as the image.

    Raises:
        ValueError: For an empty or malformed image, a non-positive downsample, or
            ``method="saturation"`` on a grey image.
    """
    params = TissueParams() if params is None else params
    _check_positive("downsample", downsample)
    mpp_pair = None if mpp is None else _mpp_pair(mpp)
    img = _as_unit_float(rgb)  # (h, w, 3) or (h, w) float32 in [0, 1]
    px_um = _mask_px_um(mpp_pair, downsample, params)
    grey = img.ndim == 2
    if grey and params.method == "saturation":
        raise ValueError("method='saturation' needs an RGB image; use 'od' or 'auto' for grey")

    if grey:
        brightest = darkest = img  # (h, w)
    else:
        # Channel by channel: much faster than a reduction over the short last axis.
        r, g, b = img[..., 0], img[..., 1], img[..., 2]
        brightest = np.maximum(np.maximum(r, g), b)  # (h, w)
        darkest = np.minimum(np.minimum(r, g), b)  # (h, w)
    white = darkest >= params.white_level
    dark = brightest <= params.black_level

    sigma_px = params.smooth_sigma_um / px_um
    tissue = np.zeros(img.shape[:2], dtype=bool)
    if params.method in ("od", "auto"):
        od = -np.log10(np.clip(img, _MIN_INTENSITY, 1.0))
        # Sum over channels; a grey pixel counts as three equal channels so the floor means
        # the same for grey and RGB images.
        od = 3.0 * od if grey else od.sum(axis=-1)
        tissue |= _above_threshold(od, dark, params.min_od, params.glass_sigmas, sigma_px)
    if params.method in ("saturation", "auto") and not grey:
        # HSV saturation, as skimage.color.rgb2hsv computes it (without the unused hue).
        saturation = np.where(
            brightest > 0, (brightest - darkest) / np.maximum(brightest, 1e-12), 0.0
        )
        tissue |= _above_threshold(
            saturation, dark, params.min_saturation, params.glass_sigmas, sigma_px
        )
    tissue &= ~white & ~dark

    tissue = _clean(tissue, dark, px_um, params)
    return TissueMask(
        mask=tissue,
        downsample=float(downsample),
        level=level,
        params=params,
        mpp=mpp_pair,
        slide_shape=None if slide_shape is None else (int(slide_shape[0]), int(slide_shape[1])),
    )


def tissue_mask(slide: SlideLike, params: TissueParams | None = None) -> TissueMask:
    """Detects tissue on a coarse level of a slide.

    The level is ``slide.level_for(mpp=params.mask_mpp)`` when the slide's mpp is known, else
    ``slide.level_for(downsample=params.mask_downsample)``. When that level is still finer
    than the target (the pyramid has no level close to it) or larger than
    ``params.max_mask_side``, it is block-averaged lazily with dask before being read, so a
    fine level is never loaded whole. Block averaging drops the last partial block of rows
    and columns (less than one mask pixel); the mask then ends slightly before the slide.

    Args:
        slide: An opened slide (see :class:`SlideLike`).
        params: Detection parameters (defaults when None).

    Returns:
        The tissue mask, with ``level``, ``mpp`` and ``slide_shape`` filled in.

    Raises:
        ValueError: For a multi-channel non-RGB slide (e.g. fluorescence), or
            ``method="saturation"`` on a grey slide.
    """
    params = TissueParams() if params is None else params
    mpp = None if slide.mpp is None else _mpp_pair(slide.mpp)
    if mpp is not None:
        target_ds = params.mask_mpp / (0.5 * (mpp[0] + mpp[1]))
    else:
        target_ds = params.mask_downsample
    # A mask larger than max_mask_side would be block-averaged down to it anyway: read the
    # coarsest level that still gives that, not a finer one (a 200,000 px slide's mask
    # then reads 625 tiles of a 6,250 px level instead of 2,401 of a 12,500 px one).
    longest = max(int(v) for v in slide.level_info[0].shape[:2])
    level = slide.level_for(downsample=max(target_ds, longest / params.max_mask_side))

    arr = slide.levels[level]
    if arr.ndim == 3 and slide.rgb and arr.shape[-1] in (3, 4):
        arr = arr[..., :3]
    elif arr.ndim != 2:
        kind = slide.pixel_kind() if hasattr(slide, "pixel_kind") else f"shape {arr.shape}"
        raise _slide_problem(
            slide,
            f"tissue detection needs an 8-bit RGB or a grey brightfield slide; this is {kind}",
        )
    level_ds = float(slide.level_info[level].downsample)
    h, w = arr.shape[:2]
    # Integer block size bringing the level to the target resolution (the level is never
    # coarser than the target), then enlarged if the mask would still be too big; never
    # past the level's own size, so a tiny slide gives a mask of one pixel, not of none.
    factor = max(1, math.floor(target_ds / level_ds + 1e-6))
    factor = max(factor, math.ceil(max(h, w) / params.max_mask_side))
    factor = max(1, min(factor, h, w))
    if factor > 1:
        arr = _coarsen(arr, factor)
    img = np.asarray(arr.compute() if hasattr(arr, "compute") else arr)
    try:
        return tissue_mask_from_rgb(
            img,
            level_ds * factor,
            params,
            mpp,
            level=level,
            slide_shape=tuple(slide.level_info[0].shape[:2]),
        )
    except _PixelError as exc:
        raise _slide_problem(slide, f"tissue detection cannot read its pixels: {exc}") from exc


class _PixelError(ValueError):
    """Pixels tissue detection cannot read (dtype, range, shape): the slide's, not the caller's."""


def _slide_problem(slide: SlideLike, problem: str) -> Exception:
    """SlideError naming the slide's file when it has one, else ValueError."""
    path = getattr(slide, "path", None)
    if path is None:
        return ValueError(problem)
    from .reader import SlideError

    return SlideError(path, problem)


# ----------------------------------------------------------------------------------------------
# Pieces and tiles


def tissue_pieces(
    mask: TissueMask,
    min_area_um2: float | None = None,
    mpp: float | Sequence[float] | None = None,
) -> list[TissuePiece]:
    """Splits a tissue mask into its connected pieces (8-connectivity).

    Args:
        mask: The tissue mask.
        min_area_um2: Pieces smaller than this are left out; None uses
            ``mask.params.min_piece_area_um2`` (which the mask already applied).
        mpp: Level-0 µm per px, one value or (x, y); None uses ``mask.mpp``, then
            ``mask.params.assumed_mpp``.

    Returns:
        The pieces, largest first; pieces of equal area in reading order of their box
        (top, then left).
    """
    if min_area_um2 is None:
        min_area_um2 = mask.params.min_piece_area_um2
    if not (math.isfinite(min_area_um2) and min_area_um2 >= 0):
        raise ValueError(f"min_area_um2 must be a finite number >= 0, got {min_area_um2}")
    mpp_pair = mask.mpp if mpp is None else _mpp_pair(mpp)
    px_um2 = _mask_px_um(mpp_pair, mask.downsample, mask.params) ** 2

    labels = measure.label(mask.mask, connectivity=2)
    found = []
    for region in measure.regionprops(labels):
        area_um2 = float(region.area) * px_um2
        if area_um2 < min_area_um2:
            continue
        r0, c0, r1, c1 = region.bbox
        mask_box = (int(c0), int(r0), int(c1 - c0), int(r1 - r0))
        found.append((float(region.area), mask_box, area_um2, region.image.copy()))
    found.sort(key=lambda f: (-f[0], f[1][1], f[1][0]))
    return [
        TissuePiece(
            label=i + 1,
            box=mask.to_level0_box(*mask_box),
            area_px=area * mask.downsample**2,
            area_um2=area_um2,
            mask=crop,
            mask_box=mask_box,
        )
        for i, (area, mask_box, area_um2, crop) in enumerate(found)
    ]


def tile_grid(
    mask: TissueMask,
    tile_size: int,
    min_tissue: float = 0.5,
    box: Sequence[float] | None = None,
    slide_shape: Sequence[int] | None = None,
) -> TileGrid:
    """Lays square tiles on the slide-wide lattice and measures their tissue fraction.

    The tissue fraction of a tile is the exact area average of the mask over the tile (mask
    pixels treated as squares of ``downsample`` level-0 px), so it is right for tiles smaller
    than a mask pixel or not aligned to mask pixels. Area beyond the mask counts as no tissue.

    Args:
        mask: The tissue mask.
        tile_size: Tile side in level-0 px.
        min_tissue: Tissue fraction in [0, 1] a tile needs to be kept (0 keeps all tiles of
            the grid, 1 only tiles fully on tissue).
        box: Level-0 (x, y, w, h) to cover, e.g. a tissue piece's box; it is snapped outward
            to the lattice and clipped to the slide. None covers the whole slide.
        slide_shape: Level-0 (height, width) of the slide; None uses ``mask.level0_shape``.

    Returns:
        The grid; tiles partly outside the slide are not part of it.
    """
    tile_size = _check_tile_size(tile_size)
    _check_fraction(min_tissue)
    height, width = (int(s) for s in (mask.level0_shape if slide_shape is None else slide_shape))
    if height < 0 or width < 0:
        raise ValueError(f"slide_shape must be non-negative, got {(height, width)}")
    # Only whole tiles: the last partial row/column of the lattice is not part of any grid.
    n_rows, n_cols = height // tile_size, width // tile_size

    if box is None:
        r0, c0, r1, c1 = 0, 0, n_rows, n_cols
    else:
        if len(box) != 4:
            raise ValueError(f"box must be (x, y, w, h), got {box}")
        bx, by, bw, bh = (float(v) for v in box)
        if bw < 0 or bh < 0:
            raise ValueError(f"box width and height must be >= 0, got {box}")
        c0 = min(max(math.floor(bx / tile_size), 0), n_cols)
        r0 = min(max(math.floor(by / tile_size), 0), n_rows)
        c1 = min(max(math.ceil((bx + bw) / tile_size), c0), n_cols)
        r1 = min(max(math.ceil((by + bh) / tile_size), r0), n_rows)

    # Tile edges in mask px: (rows + 1,) and (cols + 1,).
    ys = np.arange(r0, r1 + 1, dtype=np.float64) * tile_size / mask.downsample
    xs = np.arange(c0, c1 + 1, dtype=np.float64) * tile_size / mask.downsample
    tissue_px = _box_sums(mask.mask, ys, xs)  # (rows, cols), in mask px²
    tile_area = (tile_size / mask.downsample) ** 2
    fraction = np.clip(tissue_px / tile_area, 0.0, 1.0)
    return TileGrid(
        tile_size=tile_size,
        origin=(c0 * tile_size, r0 * tile_size),
        shape=(r1 - r0, c1 - c0),
        tissue_fraction=fraction,
        min_tissue=float(min_tissue),
        in_tissue=fraction >= min_tissue - _FRACTION_EPS,
    )


# ----------------------------------------------------------------------------------------------
# Helpers


def _above_threshold(
    feature: np.ndarray,
    dark: np.ndarray,
    floor: float,
    glass_sigmas: float | None,
    sigma_px: float,
) -> np.ndarray:
    """Otsu threshold of a feature, capped above the glass and floored; dark pixels excluded.

    Args:
        feature: (h, w) float, larger on tissue.
        dark: (h, w) bool, pixels excluded as ink/borders.
        floor: Lowest threshold allowed (keeps a blank slide blank).
        glass_sigmas: Cap in glass noise standard deviations above the glass level; None for
            no cap.
        sigma_px: Gaussian smoothing in px before thresholding.

    Returns:
        (h, w) bool, feature above the threshold.
    """
    # Ink would pull the Otsu threshold up and bleed into its neighbours when smoothed: give
    # it the value of glass instead.
    feature = np.where(dark, 0.0, feature).astype(np.float32)
    if sigma_px >= 0.25:  # below that the kernel barely changes a pixel
        feature = filters.gaussian(feature, sigma=sigma_px, mode="nearest", preserve_range=True)
    values = feature[~dark]
    if values.size == 0:
        return np.zeros(feature.shape, dtype=bool)
    lo, hi = float(values.min()), float(values.max())
    # Otsu is undefined on a constant image.
    threshold = float(filters.threshold_otsu(values)) if hi > lo else hi
    if glass_sigmas is not None:
        # Glass level and noise from the class below Otsu; a strided sample is plenty for a
        # median and keeps this cheap on large masks.
        below = values[values <= threshold]
        below = below[:: max(1, below.size // 1_000_000)]
        level = float(np.median(below))
        sigma = 1.4826 * float(np.median(np.abs(below - level)))  # MAD of a Gaussian
        threshold = min(threshold, level + glass_sigmas * sigma)
    return feature > max(threshold, floor)


def _clean(tissue: np.ndarray, dark: np.ndarray, px_um: float, params: TissueParams) -> np.ndarray:
    """Morphological clean-up of a thresholded mask, sizes converted from µm to mask px."""
    close_r = round(params.closing_radius_um / px_um)
    open_r = round(params.opening_radius_um / px_um)
    if close_r > 0:
        tissue = _padded(morphology.closing, tissue, close_r)
    if open_r > 0:
        tissue = _padded(morphology.opening, tissue, open_r)
    if params.fill_holes:
        max_hole_px = math.floor(params.max_hole_area_um2 / px_um**2)
        if max_hole_px >= 1:
            tissue = _remove_small(morphology.remove_small_holes, tissue, max_hole_px, 1)
    # Again after closing and hole filling, which can cover ink lying between tissue.
    tissue &= ~dark
    min_piece_px = params.min_piece_area_um2 / px_um**2
    if min_piece_px > 1:
        # Pieces with fewer than min_piece_px pixels go.
        tissue = _remove_small(
            morphology.remove_small_objects, tissue, math.ceil(min_piece_px) - 1, 2
        )
    return tissue


def _padded(op: Any, mask: np.ndarray, radius: int) -> np.ndarray:
    """Applies a binary morphology op with a disk, padding by edge replication.

    Tissue cut by the image border should neither erode away nor grow from the border, and
    the border handling of the ops differs between scikit-image versions.
    """
    padded = np.pad(mask, radius, mode="edge")
    out = op(padded, morphology.disk(radius))
    return np.asarray(out[radius:-radius, radius:-radius], dtype=bool)


def _remove_small(op: Any, mask: np.ndarray, max_size: int, connectivity: int) -> np.ndarray:
    """Calls remove_small_holes/objects removing components of at most ``max_size`` px.

    scikit-image 0.26 replaced ``area_threshold``/``min_size`` (strictly smaller than) by
    ``max_size`` (smaller or equal); the project supports older versions too.
    """
    if "max_size" in inspect.signature(op).parameters:
        return op(mask, max_size=max_size, connectivity=connectivity)
    legacy = "area_threshold" if op is morphology.remove_small_holes else "min_size"
    return op(mask, connectivity=connectivity, **{legacy: max_size + 1})


def _box_sums(mask: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Exact tissue area of each cell of a rectilinear grid over a piecewise-constant mask.

    The integral ``I(y, x)`` of the mask over ``[0, y) x [0, x)`` is bilinear inside each
    mask pixel, so bilinear interpolation of the summed-area table at the grid's corners is
    exact, and each cell's area is the usual four-corner difference.

    Args:
        mask: (h, w) bool.
        ys: (rows + 1,) ascending cell edges in mask px (any real values).
        xs: (cols + 1,) ascending cell edges in mask px.

    Returns:
        (rows, cols) float64 tissue area per cell, in mask px².
    """
    rows, cols = len(ys) - 1, len(xs) - 1
    h, w = mask.shape
    if rows <= 0 or cols <= 0 or h == 0 or w == 0:
        return np.zeros((max(rows, 0), max(cols, 0)))
    # Beyond the mask there is no tissue, so the integral stops growing there.
    ys = np.clip(ys, 0, h)
    xs = np.clip(xs, 0, w)
    # Only the part of the mask under the grid is summed (a piece's grid is small).
    y_lo, y_hi = math.floor(ys[0]), max(math.ceil(ys[-1]), math.floor(ys[0]) + 1)
    x_lo, x_hi = math.floor(xs[0]), max(math.ceil(xs[-1]), math.floor(xs[0]) + 1)
    y_lo, x_lo = min(y_lo, h - 1), min(x_lo, w - 1)
    sub = mask[y_lo:y_hi, x_lo:x_hi]
    ys, xs = ys - y_lo, xs - x_lo
    sh, sw = sub.shape

    table = np.zeros((sh + 1, sw + 1), dtype=np.int64)  # summed-area table, zero first row/col
    table[1:, 1:] = sub.cumsum(axis=0, dtype=np.int64).cumsum(axis=1)
    p = np.minimum(np.floor(ys).astype(np.int64), sh - 1)
    q = np.minimum(np.floor(xs).astype(np.int64), sw - 1)
    a = (ys - p)[:, None]  # (rows + 1, 1) in [0, 1]
    b = (xs - q)[None, :]  # (1, cols + 1) in [0, 1]
    integral = (
        table[np.ix_(p, q)] * (1 - a) * (1 - b)
        + table[np.ix_(p + 1, q)] * a * (1 - b)
        + table[np.ix_(p, q + 1)] * (1 - a) * b
        + table[np.ix_(p + 1, q + 1)] * a * b
    )  # (rows + 1, cols + 1)
    return integral[1:, 1:] - integral[:-1, 1:] - integral[1:, :-1] + integral[:-1, :-1]


def _coarsen(arr: Any, factor: int) -> Any:
    """Lazy block mean of a (H, W[, C]) array by ``factor``, keeping its dtype."""
    arr = arr if isinstance(arr, da.Array) else da.from_array(np.asarray(arr))
    dtype = arr.dtype
    out = da.coarsen(np.mean, arr, {0: factor, 1: factor}, trim_excess=True)
    if np.issubdtype(dtype, np.integer):
        out = da.round(out)
    return out.astype(dtype)


def _as_unit_float(image: np.ndarray) -> np.ndarray:
    """The image as float32 in [0, 1]: (h, w, 3) RGB or (h, w) grey."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[-1] in (3, 4):
        img = img[..., :3]
    elif img.ndim != 2:
        raise _PixelError(f"image must be (h, w, 3), (h, w, 4) or (h, w), got shape {img.shape}")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise _PixelError(f"image is empty, shape {img.shape}")
    if np.issubdtype(img.dtype, np.unsignedinteger):
        return img.astype(np.float32) / np.float32(np.iinfo(img.dtype).max)
    if np.issubdtype(img.dtype, np.floating):
        known = img[~np.isnan(img)]
        lo, hi = (float(known.min()), float(known.max())) if known.size else (np.nan, np.nan)
        if not (lo >= 0.0 and hi <= 1.0):  # an image of NaN fails too
            raise _PixelError(f"float images must be in [0, 1], got values in [{lo}, {hi}]")
        return img.astype(np.float32)
    raise _PixelError(f"image dtype must be unsigned integer or float, got {img.dtype}")


def _mpp_pair(mpp: float | Sequence[float]) -> tuple[float, float]:
    """(x, y) µm per px from one value or a pair, validated."""
    pair = (float(mpp), float(mpp)) if np.isscalar(mpp) else tuple(float(v) for v in mpp)
    if len(pair) != 2:
        raise ValueError(f"mpp must be one value or (x, y), got {mpp}")
    for v in pair:
        _check_positive("mpp", v)
    return pair  # type: ignore[return-value]


def _mask_px_um(mpp: tuple[float, float] | None, downsample: float, params: TissueParams) -> float:
    """Side of a mask pixel in µm (mean of x and y)."""
    level0_um = params.assumed_mpp if mpp is None else 0.5 * (mpp[0] + mpp[1])
    return level0_um * downsample


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float, np.number)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_fraction(min_tissue: float) -> None:
    if not 0 <= min_tissue <= 1:
        raise ValueError(f"min_tissue must be in [0, 1], got {min_tissue}")


def _check_tile_size(tile_size: int) -> int:
    if isinstance(tile_size, (bool, np.bool_)) or not isinstance(
        tile_size, (int, np.integer, float)
    ):
        raise ValueError(f"tile_size must be a positive integer, got {tile_size!r}")
    if tile_size != int(tile_size) or tile_size <= 0:
        raise ValueError(f"tile_size must be a positive integer, got {tile_size!r}")
    return int(tile_size)
