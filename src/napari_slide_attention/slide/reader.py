"""Open pyramidal whole-slide images lazily: ``open_slide(path) -> Slide``.

TIFF-based formats (Aperio SVS, Hamamatsu NDPI, OME-TIFF, generic pyramidal or
single-level tiled TIFF) are read through tifffile's zarr view of the file; OME-Zarr
through zarr. Every level is a dask array chunked at the file's native tile size, so
nothing is decoded until a region is asked for.

Coordinates: ``x``/``y`` are columns/rows in level-0 pixels everywhere in this package;
``mpp`` is micrometres per level-0 pixel as ``(x, y)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import threading
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import tifffile
import zarr

__all__ = [
    "Level",
    "MissingMppWarning",
    "Slide",
    "SlideError",
    "open_slide",
]

# Extensions that are whole-slide formats and nothing else: a failure to open one of
# these is reported to the user rather than left for another reader to try.
SLIDE_SUFFIXES = (".svs", ".ndpi", ".ome.tif", ".ome.tiff", ".ome.zarr", ".btf", ".tf8", ".qptiff")
TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".btf", ".tf8", ".qptiff")
# Formats people will drop on us that we do not read; named so the error says so.
UNSUPPORTED_SUFFIXES = {
    ".mrxs": "3DHISTECH MIRAX",
    ".czi": "Zeiss CZI",
    ".vsi": "Olympus VSI",
    ".isyntax": "Philips iSyntax",
    ".scn": "Leica SCN",
    ".bif": "Ventana BIF",
    ".vms": "Hamamatsu VMS",
    ".vmu": "Hamamatsu VMU",
    ".dcm": "DICOM",
}
# A microscope's pixel is between ~10 nm and ~100 µm; TIFF writers that put 72 dpi
# (353 µm/px) into the resolution tags are not describing a microscope.
_PLAUSIBLE_MPP = (0.01, 100.0)
# Virtual levels for single-level slides stop once the largest side fits this.
_VIRTUAL_MIN_SIDE = 2048
_ASSOCIATED_NAMES = ("label", "macro", "thumbnail", "map", "overview")


class SlideError(Exception):
    """A slide that cannot be opened or read; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class MissingMppWarning(UserWarning):
    """The slide has no usable pixel size; coordinates fall back to pixels."""


@dataclass(frozen=True)
class Level:
    """One level of a slide's pyramid.

    Attributes:
        index: position in the pyramid, 0 = full resolution.
        shape: (height, width) in this level's pixels.
        downsample: level-0 pixels per pixel of this level.
        tile_shape: (height, width) of the stored tiles or strips; None for levels
            computed on the fly.
        virtual: True when the level is not stored in the file but computed from
            the level above it (single-level slides).
    """

    index: int
    shape: tuple[int, int]
    downsample: float
    tile_shape: tuple[int, int] | None
    virtual: bool = False


class _CheckedLevel:
    """Array view of one stored level that turns read failures into SlideError.

    dask slices it chunk by chunk. Before a read the tiles it touches are checked
    against the file's length, so a truncated file fails with the tile's position
    instead of decoding a short buffer into garbage.
    """

    def __init__(
        self,
        path: Path,
        level: int,
        array: Any,
        *,
        page: tifffile.TiffPage | None = None,
        file_size: int | None = None,
    ):
        self.path = path
        self.level = level
        self.array = array
        self.shape = tuple(array.shape)
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)
        self.page = page
        self.file_size = file_size
        self._beyond_eof: np.ndarray | None = None
        if page is not None and file_size is not None:
            offsets = np.asarray(page.dataoffsets, dtype=np.int64)
            counts = np.asarray(page.databytecounts, dtype=np.int64)
            self._beyond_eof = offsets + counts > file_size

    def _segments(self, rows: slice, cols: slice) -> Iterator[tuple[int, int, int]]:
        """Yield (segment index, tile row, tile column) of the stored segments a read touches."""
        page = self.page
        height, width = self.shape[0], self.shape[1]
        if page.is_tiled:
            tile_h, tile_w = page.tilelength, page.tilewidth
        else:
            tile_h, tile_w = page.rowsperstrip or height, width
        per_row = max(1, math.ceil(width / tile_w))
        r0, r1 = (rows.start or 0) // tile_h, max(0, math.ceil((rows.stop or height) / tile_h) - 1)
        c0, c1 = (cols.start or 0) // tile_w, max(0, math.ceil((cols.stop or width) / tile_w) - 1)
        for r in range(r0, r1 + 1):
            for c in range(c0, c1 + 1):
                yield r * per_row + c, r, c

    def _check_extent(self, key: tuple[slice, ...]) -> None:
        if self._beyond_eof is None or not self._beyond_eof.any():
            return
        for index, r, c in self._segments(key[0], key[1]):
            if index < len(self._beyond_eof) and self._beyond_eof[index]:
                raise SlideError(
                    self.path,
                    f"truncated file: level {self.level} tile (row {r}, column {c}) lies beyond "
                    f"the end of the file ({self.file_size} bytes); the file was cut short "
                    "while copying or writing",
                )

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        self._check_extent(key)
        try:
            return np.asarray(self.array[key])
        except SlideError:
            raise
        except Exception as exc:  # decoder and zarr errors come in many types
            raise self._locate_failure(key, exc) from exc

    def _locate_failure(self, key: tuple[slice, ...], exc: Exception) -> SlideError:
        """Name the stored tile that fails to decode, reading the region tile by tile."""
        rows, cols = key[0], key[1]
        where = f"rows {rows.start}:{rows.stop}, columns {cols.start}:{cols.stop}"
        if self.page is not None:
            tile_h, tile_w = _tile_shape(self.page)
            for _, r, c in self._segments(rows, cols):
                tile = (slice(r * tile_h, (r + 1) * tile_h), slice(c * tile_w, (c + 1) * tile_w))
                try:
                    self.array[tile + key[2:]]
                except Exception as tile_exc:
                    exc = tile_exc
                    where = (
                        f"tile (row {r}, column {c}) at level pixels y={r * tile_h}, x={c * tile_w}"
                    )
                    break
        return SlideError(
            self.path,
            f"corrupt image data: level {self.level} {where} cannot be decoded "
            f"({type(exc).__name__}: {exc})",
        )


class _AssociatedImages(Mapping):
    """Label, macro and thumbnail images, read when first asked for."""

    def __init__(self, path: Path, readers: dict[str, Any]):
        self._path = path
        self._readers = readers
        self._cache: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._readers:
            raise KeyError(name)
        if name not in self._cache:
            try:
                self._cache[name] = np.asarray(self._readers[name]())
            except Exception as exc:
                raise SlideError(self._path, f"cannot read the {name} image: {exc}") from exc
        return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)


@dataclass
class Slide:
    """A whole-slide image opened lazily.

    Attributes:
        path: the file or OME-Zarr directory.
        vendor: "aperio", "hamamatsu", "ome-tiff", "generic-tiff" or "ome-zarr".
        levels: one dask array per pyramid level, level 0 first; (H, W, 3) uint8 for
            RGB slides, (H, W) or (H, W, C) channels-last otherwise.
        level_info: shape, downsample and tile size of each level.
        mpp: (x, y) micrometres per level-0 pixel, or None when unknown.
        mpp_source: where mpp came from ("metadata", "override") or None.
        magnification: objective magnification (e.g. 20.0) or None when unknown.
        rgb: True for 8-bit RGB brightfield slides (the models' input).
        associated: label/macro/thumbnail images, read on first access.
        metadata: the vendor's metadata as a flat dict.
        notes: non-fatal problems found while opening (shown by ``info``).
    """

    path: Path
    vendor: str
    levels: list[da.Array]
    level_info: list[Level]
    mpp: tuple[float, float] | None
    mpp_source: str | None
    magnification: float | None
    rgb: bool
    associated: Mapping[str, np.ndarray]
    metadata: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    _sources: list[Any] = field(default_factory=list, repr=False)
    _pages: list[tifffile.TiffPage | None] = field(default_factory=list, repr=False)
    _closers: list[Any] = field(default_factory=list, repr=False)

    # -- geometry ---------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0 in pixels."""
        height, width = self.level_info[0].shape
        return width, height

    @property
    def level_count(self) -> int:
        return len(self.levels)

    @property
    def dtype(self) -> np.dtype:
        return self.levels[0].dtype

    @property
    def channels(self) -> int:
        return 1 if self.levels[0].ndim == 2 else int(self.levels[0].shape[2])

    @property
    def tile_shape(self) -> tuple[int, int] | None:
        """(height, width) of level 0's stored tiles or strips."""
        return self.level_info[0].tile_shape

    def level_mpp(self, level: int) -> tuple[float, float] | None:
        """Micrometres per pixel (x, y) at a level, or None when the slide's mpp is unknown."""
        if self.mpp is None:
            return None
        info = self.level_info[level]
        height0, width0 = self.level_info[0].shape
        return (
            self.mpp[0] * width0 / info.shape[1],
            self.mpp[1] * height0 / info.shape[0],
        )

    def level_for(self, mpp: float | None = None, downsample: float | None = None) -> int:
        """Return the coarsest level that is still at least as fine as asked.

        Args:
            mpp: wanted micrometres per pixel (needs the slide's mpp).
            downsample: wanted level-0 pixels per pixel.
        """
        if (mpp is None) == (downsample is None):
            raise ValueError("level_for takes exactly one of mpp= or downsample=")
        if mpp is not None:
            if mpp <= 0:
                raise ValueError(f"mpp must be positive, got {mpp}")
            if self.mpp is None:
                raise SlideError(
                    self.path,
                    "the slide's pixel size (mpp) is unknown, so a level cannot be chosen "
                    "by mpp; pass mpp= to open_slide or --mpp on the command line",
                )
            downsample = mpp / (0.5 * (self.mpp[0] + self.mpp[1]))
        if downsample <= 0:
            raise ValueError(f"downsample must be positive, got {downsample}")
        best = 0
        for info in self.level_info:
            # A hair of tolerance: stored levels are rounded (e.g. 4.0007 for "4").
            if info.downsample <= downsample * 1.001:
                best = info.index
        return best

    # -- pixels -----------------------------------------------------------------------
    @property
    def fill_value(self) -> int:
        """What pixels outside the slide read as: white for RGB (glass), 0 otherwise."""
        return 255 if self.rgb else 0

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Return the pixels of a level-0 box read at a level.

        The box (x, y, w, h) is in level-0 pixels; the result has
        ``(round(h / downsample), round(w / downsample))`` rows and columns of that
        level. Parts outside the slide read as ``fill_value``.

        Args:
            level: pyramid level to read from.
            x: left edge, level-0 px (may be negative).
            y: top edge, level-0 px (may be negative).
            w: width, level-0 px.
            h: height, level-0 px.
        """
        if not 0 <= level < self.level_count:
            raise ValueError(f"level {level} does not exist (the slide has {self.level_count})")
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got w={w}, h={h}")
        info = self.level_info[level]
        height, width = info.shape
        sy = self.level_info[0].shape[0] / height
        sx = self.level_info[0].shape[1] / width
        lx0, ly0 = math.floor(x / sx), math.floor(y / sy)
        out_w, out_h = max(1, round(w / sx)), max(1, round(h / sy))
        out_shape = (out_h, out_w, *self.levels[level].shape[2:])
        cx0, cy0 = max(lx0, 0), max(ly0, 0)
        cx1, cy1 = min(lx0 + out_w, width), min(ly0 + out_h, height)
        if cx0 >= cx1 or cy0 >= cy1:
            return np.full(out_shape, self.fill_value, dtype=self.dtype)
        pixels = self._sources[level][cy0:cy1, cx0:cx1]
        if pixels.shape[:2] == (out_h, out_w):
            return pixels
        out = np.full(out_shape, self.fill_value, dtype=self.dtype)
        out[cy0 - ly0 : cy1 - ly0, cx0 - lx0 : cx1 - lx0] = pixels
        return out

    def tiff_page(self, level: int) -> tifffile.TiffPage | None:
        """Return the TIFF page that stores a level, or None (OME-Zarr, virtual levels).

        TileStream decodes that page's tiles itself on its fast path.
        """
        return self._pages[level] if level < len(self._pages) else None

    # -- description ------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Return the slide's facts as plain JSON-able values (``slide-attention info``)."""
        return {
            "path": str(self.path),
            "vendor": self.vendor,
            "dimensions": list(self.dimensions),
            "dtype": str(self.dtype),
            "channels": self.channels,
            "rgb": self.rgb,
            "mpp": list(self.mpp) if self.mpp else None,
            "mpp_source": self.mpp_source,
            "magnification": self.magnification,
            "tile_shape": list(self.tile_shape) if self.tile_shape else None,
            "levels": [
                {
                    "index": info.index,
                    "shape": list(info.shape),
                    "downsample": round(info.downsample, 4),
                    "mpp": [round(v, 5) for v in self.level_mpp(info.index)] if self.mpp else None,
                    "tile_shape": list(info.tile_shape) if info.tile_shape else None,
                    "virtual": info.virtual,
                }
                for info in self.level_info
            ],
            "associated": list(self.associated),
            "notes": list(self.notes),
        }

    def close(self) -> None:
        """Close the file; the slide's arrays cannot be read afterwards."""
        for closer in self._closers:
            with contextlib.suppress(Exception):
                closer()
        self._closers.clear()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------
# Opening
# ----------------------------------------------------------------------------------------


def open_slide(
    path: str | Path,
    *,
    mpp: float | tuple[float, float] | None = None,
    magnification: float | None = None,
) -> Slide:
    """Open a whole-slide image lazily and return a Slide.

    Args:
        path: an SVS, NDPI, OME-TIFF, pyramidal or tiled TIFF file, or an OME-Zarr
            directory.
        mpp: micrometres per level-0 pixel, overriding (or supplying) the file's own;
            one number or (x, y).
        magnification: objective magnification overriding the file's own.

    Raises:
        SlideError: the file is missing, not a slide, or damaged; the message says which.
    """
    path = Path(path)
    if not path.exists():
        raise SlideError(path, "no such file or directory")
    override = _normalise_mpp(path, mpp)
    suffix = _suffix(path)
    if suffix in UNSUPPORTED_SUFFIXES:
        raise SlideError(
            path,
            f"{UNSUPPORTED_SUFFIXES[suffix]} files are not supported; "
            "convert the slide to OME-TIFF (e.g. with bfconvert) or OME-Zarr (bioformats2raw)",
        )
    slide = _open_ome_zarr(path) if path.is_dir() else _open_tiff(path)
    if override is not None:
        slide.mpp, slide.mpp_source = override, "override"
    if magnification is not None:
        if magnification <= 0:
            raise ValueError(f"magnification must be positive, got {magnification}")
        slide.magnification = float(magnification)
    if slide.mpp is None:
        warnings.warn(
            f"{path}: the slide has no usable pixel size (mpp); distances are in pixels. "
            "Pass mpp= to open_slide (or --mpp) if you know it.",
            MissingMppWarning,
            stacklevel=2,
        )
    return slide


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for double in (".ome.tif", ".ome.tiff", ".ome.zarr"):
        if name.endswith(double):
            return double
    return path.suffix.lower()


def _normalise_mpp(path: Path, mpp: float | tuple[float, float] | None) -> tuple | None:
    if mpp is None:
        return None
    values = (float(mpp), float(mpp)) if np.isscalar(mpp) else tuple(float(v) for v in mpp)
    if len(values) != 2 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"mpp must be a positive number or (x, y) pair, got {mpp!r}")
    return values


class _LogCollector(logging.Handler):
    """Collects what tifffile logs while a file is parsed (its way of reporting damage)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _collect_tifffile_log() -> Iterator[_LogCollector]:
    log = logging.getLogger("tifffile")
    handler = _LogCollector()
    log.addHandler(handler)
    propagate = log.propagate
    log.propagate = False  # reported through SlideError/notes instead of stderr
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.propagate = propagate


def _sniff(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(16)
    except OSError as exc:
        raise SlideError(path, f"cannot read the file: {exc.strerror or exc}") from exc


def _open_tiff(path: Path) -> Slide:
    head = _sniff(path)
    if not head:
        raise SlideError(path, "the file is empty")
    if head[:4] not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        raise SlideError(path, f"not a TIFF-based slide (the file starts with {head[:8]!r})")
    file_size = path.stat().st_size
    with _collect_tifffile_log() as log:
        try:
            tif = tifffile.TiffFile(path)
        except Exception as exc:
            raise SlideError(path, f"not a readable TIFF: {exc}") from exc
        try:
            return _slide_from_tiff(path, tif, file_size, log)
        except SlideError:
            tif.close()
            raise
        except Exception as exc:
            tif.close()
            detail = f" (tifffile: {log.messages[-1]})" if log.messages else ""
            raise SlideError(path, f"damaged or unsupported TIFF: {exc}{detail}") from exc


def _slide_from_tiff(path: Path, tif: tifffile.TiffFile, file_size: int, log) -> Slide:
    try:
        all_series = tif.series
    except Exception as exc:
        raise SlideError(path, f"cannot parse the TIFF structure: {exc}") from exc
    if not all_series:
        detail = f": {log.messages[-1]}" if log.messages else ""
        raise SlideError(path, f"the TIFF holds no readable image (truncated or corrupt?){detail}")
    vendor = _tiff_vendor(tif)
    series = _main_series(tif, all_series)
    page0 = series.keyframe
    # Leave the zarr view's missing tiles as glass (white) on RGB slides.
    axes = series.axes
    dtype = np.dtype(series.dtype)
    metadata, mpp, magnification = _tiff_metadata(path, tif, vendor, page0)
    notes = list(dict.fromkeys(re.sub(r"^<tifffile\.\w+ '[^']*'> ", "", m) for m in log.messages))

    layout = _layout(path, axes, series.shape, dtype)
    fill = 255 if layout.rgb else 0
    store = series.aszarr(fillvalue=fill)
    root = zarr.open(store, mode="r")
    stored_levels = series.levels
    level_arrays = (
        [root]
        if isinstance(root, zarr.Array)
        else [root[str(i)] for i in range(len(stored_levels))]
    )

    levels: list[da.Array] = []
    infos: list[Level] = []
    sources: list[Any] = []
    pages: list[tifffile.TiffPage | None] = []
    height0 = width0 = None
    for index, (level_series, zarray) in enumerate(zip(stored_levels, level_arrays, strict=True)):
        page = level_series.keyframe
        single_page = len(level_series.pages) == 1 and page.planarconfig == 1
        checked = _CheckedLevel(
            path,
            index,
            zarray,
            page=page if single_page else None,
            file_size=file_size if single_page else None,
        )
        native = _native_chunks(page, zarray)
        array = _lazy_level(path, index, checked, native, layout)
        height, width = array.shape[:2]
        if index == 0:
            height0, width0 = height, width
        if index and (height >= levels[-1].shape[0] or width >= levels[-1].shape[1]):
            notes.append(
                f"level {index} ({width}x{height}) is not smaller than the one above; ignored"
            )
            break
        levels.append(array)
        infos.append(
            Level(
                index=index,
                shape=(height, width),
                downsample=_downsample((height0, width0), (height, width)),
                tile_shape=_tile_shape(page),
                virtual=False,
            )
        )
        sources.append(_LayoutSource(checked, layout))
        pages.append(page if single_page and layout.native else None)

    if len(levels) == 1:
        _add_virtual_levels(levels, infos, sources, pages)

    associated = _tiff_associated(tif, all_series, series)
    slide = Slide(
        path=path,
        vendor=vendor,
        levels=levels,
        level_info=infos,
        mpp=mpp,
        mpp_source="metadata" if mpp else None,
        magnification=magnification,
        rgb=layout.rgb,
        associated=_AssociatedImages(path, associated),
        metadata=metadata,
        notes=notes + layout.notes,
        _sources=sources,
        _pages=pages,
        _closers=[tif.close],
    )
    return slide


def _lazy_level(path: Path, index: int, checked: _CheckedLevel, chunks, layout) -> da.Array:
    """One level as a dask array over its checked view, in (Y, X[, C]) layout."""
    array = da.from_array(
        checked,
        chunks=chunks,
        lock=False,
        asarray=False,
        fancy=False,
        name=f"slide-{_token(path)}-{index}",
        meta=np.empty((0,) * checked.ndim, dtype=checked.dtype),
    )
    return layout.to_yxc(array)


def _downsample(shape0: tuple[int, int], shape: tuple[int, int]) -> float:
    """Level-0 pixels per pixel of a level: the mean of the row and column ratios."""
    return 0.5 * (shape0[1] / shape[1] + shape0[0] / shape[0])


def _token(path: Path) -> str:
    """A name for the slide's dask arrays that changes when the file does."""
    stat = path.stat()
    text = f"{path.resolve()}-{stat.st_size}-{stat.st_mtime_ns}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _tiff_vendor(tif: tifffile.TiffFile) -> str:
    if tif.is_svs:
        return "aperio"
    if tif.is_ndpi:
        return "hamamatsu"
    if tif.is_ome:
        return "ome-tiff"
    return "generic-tiff"


def _main_series(tif: tifffile.TiffFile, all_series) -> tifffile.TiffPageSeries:
    """The pyramid: the series with the most pixels (SVS/NDPI put it first, OME may not)."""
    candidates = [s for s in all_series if (s.name or "").lower() not in _ASSOCIATED_NAMES]
    candidates = candidates or list(all_series)
    return max(candidates, key=lambda s: (s.size, -all_series.index(s)))


def _tile_shape(page: tifffile.TiffPage) -> tuple[int, int]:
    if page.is_tiled:
        return (int(page.tilelength), int(page.tilewidth))
    return (int(page.rowsperstrip or page.imagelength), int(page.imagewidth))


def _native_chunks(page: tifffile.TiffPage, zarray) -> tuple[int, ...]:
    """dask chunks = the zarr view's chunks, with thin strips grouped to >= 256 rows."""
    chunks = list(zarray.chunks)
    shape = zarray.shape
    row_axis = 0 if len(shape) == 2 or (shape[-1] in (3, 4) and len(shape) == 3) else len(shape) - 2
    if not page.is_tiled and chunks[row_axis] < 256:
        chunks[row_axis] = min(
            shape[row_axis], chunks[row_axis] * math.ceil(256 / chunks[row_axis])
        )
    return tuple(chunks)


@dataclass
class _Layout:
    """How a stored array maps to (Y, X) or (Y, X, C) channels-last."""

    axes: str
    rgb: bool
    transpose: tuple[int, ...] | None
    squeeze: tuple[int, ...]
    drop_alpha: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def native(self) -> bool:
        """True when the stored layout is already (Y, X[, S]) so tiles decode in place."""
        return self.transpose is None and not self.squeeze and not self.drop_alpha

    def to_yxc(self, array):
        if self.squeeze:
            index = tuple(0 if i in self.squeeze else slice(None) for i in range(array.ndim))
            array = array[index]
        if self.transpose is not None:
            array = array.transpose(self.transpose)
        if self.drop_alpha:
            array = array[..., :3]
        return array


class _LayoutSource:
    """Region reads from a checked level, returned in the slide's (Y, X[, C]) layout."""

    def __init__(self, checked: _CheckedLevel, layout: _Layout):
        self.checked = checked
        self.layout = layout
        self._axes = [a for i, a in enumerate(layout.axes) if i not in layout.squeeze]

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rows, cols = key
        full = []
        for i, axis in enumerate(self.layout.axes):
            if i in self.layout.squeeze:
                full.append(0)
            elif axis == "Y":
                full.append(rows)
            elif axis == "X":
                full.append(cols)
            else:
                full.append(slice(None))
        if all(isinstance(k, slice) for k in full):
            pixels = self.checked[tuple(full)]
        else:
            pixels = np.asarray(self.checked.array[tuple(full)])
        if self.layout.transpose is not None:
            pixels = pixels.transpose(self.layout.transpose)
        if self.layout.drop_alpha:
            pixels = pixels[..., :3]
        return pixels


def _layout(path: Path, axes: str, shape: tuple[int, ...], dtype: np.dtype) -> _Layout:
    """Decide how to present a stored array, refusing layouts that are not slides.

    RGB(A) 8-bit -> (Y, X, 3) RGB. Grayscale (any integer or float type) -> (Y, X).
    Multichannel (C, or S != 3/4) -> (Y, X, C) channels-last, not RGB. Z/T/other
    axes of length 1 are dropped; longer ones are refused (z-stacks and time series
    are not whole-slide images).
    """
    axes = axes.upper()
    squeeze = []
    channel_axis = None
    for i, (axis, size) in enumerate(zip(axes, shape, strict=True)):
        if axis in "YX":
            continue
        if axis in "SC" and channel_axis is None and size > 1:
            channel_axis = i
            continue
        if size == 1:
            squeeze.append(i)
            continue
        raise SlideError(
            path,
            f"unsupported pixel layout: axes {axes} with shape {shape}; only 2-D images "
            "(one plane, optionally with channels) are slides. Save one plane as its own file.",
        )
    if "Y" not in axes or "X" not in axes:
        raise SlideError(path, f"unsupported pixel layout: axes {axes} have no Y and X")
    kept = [i for i in range(len(axes)) if i not in squeeze]
    order = [axes.index("Y"), axes.index("X")] + (
        [channel_axis] if channel_axis is not None else []
    )
    transpose = tuple(kept.index(i) for i in order)
    if transpose == tuple(range(len(transpose))):
        transpose = None
    channels = shape[channel_axis] if channel_axis is not None else 1
    rgb = (
        dtype == np.uint8
        and channel_axis is not None
        and axes[channel_axis] == "S"
        and channels in (3, 4)
    )
    if (
        dtype == np.uint8
        and channel_axis is not None
        and axes[channel_axis] == "C"
        and channels == 3
    ):
        rgb = True  # planar RGB (OME writers store it as C)
    notes = []
    if not rgb:
        notes.append(
            f"not an 8-bit RGB slide ({channels} channel(s) of {dtype}): opened as "
            f"{'grayscale' if channels == 1 else 'multichannel'}; the models need RGB brightfield"
        )
    return _Layout(
        axes=axes,
        rgb=bool(rgb),
        transpose=transpose,
        squeeze=tuple(squeeze),
        drop_alpha=bool(rgb and channels == 4),
        notes=notes,
    )


class _DaskSource:
    """Region reads from a computed (virtual) level."""

    def __init__(self, array: da.Array):
        self.array = array

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        return self.array[key].compute(scheduler="threads")


def _add_virtual_levels(levels, infos, sources, pages) -> None:
    """Give a single-level slide lower levels, computed lazily by 2x2 means, for display."""
    base = levels[0]
    height0, width0 = base.shape[:2]
    current = base
    while max(current.shape[:2]) > _VIRTUAL_MIN_SIDE:
        if min(current.shape[:2]) < 4:
            break
        # Chunks must be even along the axes that are halved; 512 keeps chunk counts modest.
        rechunked = current.rechunk({0: 512, 1: 512})
        axes = {0: 2, 1: 2}
        dtype = current.dtype
        down = da.coarsen(np.mean, rechunked, axes, trim_excess=True, dtype=np.float32)
        if np.issubdtype(dtype, np.integer):
            down = da.round(down)
        current = down.astype(dtype)
        height, width = current.shape[:2]
        levels.append(current)
        infos.append(
            Level(
                index=len(infos),
                shape=(height, width),
                downsample=_downsample((height0, width0), (height, width)),
                tile_shape=None,
                virtual=True,
            )
        )
        sources.append(_DaskSource(current))
        pages.append(None)


# ----------------------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------------------

_UNIT_TO_UM = {
    "m": 1e6,
    "meter": 1e6,
    "cm": 1e4,
    "centimeter": 1e4,
    "mm": 1e3,
    "millimeter": 1e3,
    "µm": 1.0,
    "um": 1.0,
    "μm": 1.0,
    "micron": 1.0,
    "micrometer": 1.0,
    "nm": 1e-3,
    "nanometer": 1e-3,
}


def _plausible(path: Path, mpp: tuple[float, float] | None, source: str, notes: list[str]):
    if mpp is None:
        return None
    if all(_PLAUSIBLE_MPP[0] <= v <= _PLAUSIBLE_MPP[1] for v in mpp):
        return (float(mpp[0]), float(mpp[1]))
    notes.append(f"ignored implausible pixel size {mpp} µm from {source}")
    return None


def _tiff_metadata(path: Path, tif, vendor: str, page) -> tuple[dict, tuple | None, float | None]:
    metadata: dict[str, Any] = {}
    notes: list[str] = []
    mpp = None
    magnification = None
    if vendor == "aperio":
        svs = tifffile.tifffile.svs_description_metadata(page.description)
        metadata.update({k: v for k, v in svs.items() if k != "Header"})
        metadata["Header"] = svs.get("Header", "").strip()
        if "MPP" in svs:
            mpp = _plausible(path, (float(svs["MPP"]),) * 2, "Aperio MPP", notes)
        if "AppMag" in svs:
            magnification = float(svs["AppMag"])
    elif vendor == "hamamatsu":
        tags = page.ndpi_tags or {}
        metadata.update({k: _jsonable(v) for k, v in tags.items() if k != "McuStarts"})
        mag = tags.get("Magnification")
        if mag is not None and float(mag) > 0:
            magnification = float(mag)
        mpp = _plausible(path, _resolution_mpp(page), "resolution tags", notes)
    elif vendor == "ome-tiff":
        mpp, magnification, ome = _ome_xml_metadata(tif.ome_metadata)
        metadata.update(ome)
        mpp = _plausible(path, mpp, "OME PhysicalSize", notes)
    if vendor == "generic-tiff":
        desc = page.description or ""
        if desc.startswith("{"):
            with contextlib.suppress(ValueError):
                info = json.loads(desc)
                if isinstance(info, dict):
                    metadata.update({k: v for k, v in info.items() if k != "shape"})
                    if "mpp" in info:
                        value = info["mpp"]
                        pair = tuple(value) if isinstance(value, list | tuple) else (value, value)
                        mpp = _plausible(path, tuple(float(v) for v in pair), "description", notes)
                    if info.get("magnification"):
                        magnification = float(info["magnification"])
        if mpp is None:
            mpp = _plausible(path, _resolution_mpp(page), "resolution tags", notes)
        for name in ("Make", "Model", "Software"):
            value = page.tags.valueof(name)
            if value:
                metadata[name] = str(value)
    if notes:
        metadata["notes"] = notes
    return metadata, mpp, magnification


def _resolution_mpp(page) -> tuple[float, float] | None:
    """Micrometres per pixel from the TIFF resolution tags, or None when absent or unitless."""
    unit = page.tags.valueof("ResolutionUnit")
    xres, yres = page.tags.valueof("XResolution"), page.tags.valueof("YResolution")
    if unit is None or int(unit) == 1 or not xres or not yres:
        return None
    um_per_unit = 1e4 if int(unit) == 3 else 25400.0

    def ratio(value) -> float:
        if isinstance(value, tuple):
            return value[0] / value[1] if value[1] else 0.0
        return float(value)

    x, y = ratio(xres), ratio(yres)
    if x <= 0 or y <= 0:
        return None
    return (um_per_unit / x, um_per_unit / y)


def _ome_xml_metadata(xml: str | None) -> tuple[tuple | None, float | None, dict]:
    if not xml:
        return None, None, {}
    try:
        ome = tifffile.xml2dict(xml)["OME"]
    except Exception:
        return None, None, {}
    images = ome.get("Image", {})
    image = images[0] if isinstance(images, list) else images
    pixels = image.get("Pixels", {})
    metadata = {"Name": image.get("Name")}
    mpp = None
    if "PhysicalSizeX" in pixels and "PhysicalSizeY" in pixels:
        ux = _UNIT_TO_UM.get(str(pixels.get("PhysicalSizeXUnit", "µm")))
        uy = _UNIT_TO_UM.get(str(pixels.get("PhysicalSizeYUnit", "µm")))
        if ux and uy:
            mpp = (float(pixels["PhysicalSizeX"]) * ux, float(pixels["PhysicalSizeY"]) * uy)
    magnification = None
    instrument = ome.get("Instrument", {})
    instrument = instrument[0] if isinstance(instrument, list) else instrument
    objective = instrument.get("Objective", {}) if isinstance(instrument, dict) else {}
    objective = objective[0] if isinstance(objective, list) else objective
    if isinstance(objective, dict) and objective.get("NominalMagnification"):
        magnification = float(objective["NominalMagnification"])
        metadata["Objective"] = objective.get("Model") or objective.get("ID")
    for key in ("PhysicalSizeX", "PhysicalSizeY", "PhysicalSizeXUnit", "PhysicalSizeYUnit"):
        if key in pixels:
            metadata[key] = pixels[key]
    return mpp, magnification, metadata


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= 16 else f"array{value.shape}"
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _tiff_associated(tif, all_series, main) -> dict[str, Any]:
    """Associated images of a TIFF slide by name: readers that decode on first access."""
    found: dict[str, Any] = {}
    for series in all_series:
        if series is main:
            continue
        name = (series.name or "").strip().lower()
        key = next((n for n in _ASSOCIATED_NAMES if n in name), None)
        if key is None or key in found:
            continue
        found[key] = _series_reader(series)
    return found


def _series_reader(series):
    lock = threading.Lock()

    def read() -> np.ndarray:
        with lock:
            return series.asarray()

    return read


# ----------------------------------------------------------------------------------------
# OME-Zarr
# ----------------------------------------------------------------------------------------


def _open_ome_zarr(path: Path) -> Slide:
    try:
        group = zarr.open_group(path, mode="r")
    except Exception as exc:
        raise SlideError(path, f"a directory that is not an OME-Zarr image: {exc}") from exc
    attrs = dict(group.attrs)
    ngff = attrs.get("ome", attrs)  # NGFF 0.5 nests under "ome"; 0.4 is flat
    multiscales = ngff.get("multiscales")
    if not multiscales:
        raise SlideError(path, "not an OME-Zarr image: the group has no 'multiscales' metadata")
    ms = multiscales[0]
    axes_meta = ms.get("axes") or [{"name": a} for a in "tczyx"]
    names = "".join((a["name"] if isinstance(a, dict) else str(a))[0].upper() for a in axes_meta)
    units = {
        (a["name"] if isinstance(a, dict) else str(a)).upper(): (
            a.get("unit") if isinstance(a, dict) else None
        )
        for a in axes_meta
    }
    datasets = ms.get("datasets") or []
    if not datasets:
        raise SlideError(path, "OME-Zarr multiscales lists no datasets")
    notes: list[str] = []
    levels: list[da.Array] = []
    infos: list[Level] = []
    sources: list[Any] = []
    layout = None
    scale0 = None
    for index, dataset in enumerate(datasets):
        try:
            zarray = group[dataset["path"]]
        except Exception as exc:
            raise SlideError(
                path, f"OME-Zarr level {dataset.get('path')!r} is missing: {exc}"
            ) from exc
        if layout is None:
            layout = _layout(path, names, zarray.shape, np.dtype(zarray.dtype))
        checked = _CheckedLevel(path, index, zarray)
        array = _lazy_level(path, index, checked, zarray.chunks, layout)
        if index == 0:
            scale0 = _ngff_scale(dataset, ms)
        height, width = array.shape[:2]
        height0, width0 = levels[0].shape[:2] if levels else (height, width)
        yx_axis = names.index("Y"), names.index("X")
        chunks = zarray.chunks
        levels.append(array)
        infos.append(
            Level(
                index=index,
                shape=(height, width),
                downsample=_downsample((height0, width0), (height, width)),
                tile_shape=(int(chunks[yx_axis[0]]), int(chunks[yx_axis[1]])),
            )
        )
        sources.append(_LayoutSource(checked, layout))
    mpp = None
    if scale0 is not None:
        sy, sx = scale0[names.index("Y")], scale0[names.index("X")]
        unit_y, unit_x = units.get("Y"), units.get("X")
        if unit_x is None and unit_y is None and (sx, sy) != (1.0, 1.0):
            notes.append("OME-Zarr axes have no unit; assumed micrometres")
            unit_x = unit_y = "micrometer"
        factor_x, factor_y = (
            _UNIT_TO_UM.get(str(unit_x).lower()),
            _UNIT_TO_UM.get(str(unit_y).lower()),
        )
        if factor_x and factor_y:
            mpp = _plausible(path, (sx * factor_x, sy * factor_y), "OME-Zarr scale", notes)
    associated = {}
    for name in _ASSOCIATED_NAMES:
        if name in group and isinstance(group[name], zarr.Array):
            associated[name] = lambda arr=group[name]: arr[...]
    if "labels" in group:
        notes.append("OME-Zarr label images are not shown as slide images")
    return Slide(
        path=path,
        vendor="ome-zarr",
        levels=levels,
        level_info=infos,
        mpp=mpp,
        mpp_source="metadata" if mpp else None,
        magnification=_ngff_magnification(ngff),
        rgb=layout.rgb,
        associated=_AssociatedImages(path, associated),
        metadata={
            "multiscales": ms.get("name") or "",
            "version": ms.get("version") or ngff.get("version"),
        },
        notes=notes + layout.notes,
        _sources=sources,
        _pages=[None] * len(levels),
    )


def _ngff_scale(dataset: dict, ms: dict) -> list[float] | None:
    scale = None
    for transform in dataset.get("coordinateTransformations", []):
        if transform.get("type") == "scale":
            scale = [float(v) for v in transform["scale"]]
    for transform in ms.get("coordinateTransformations", []) or []:
        if transform.get("type") == "scale" and scale is not None:
            scale = [a * float(b) for a, b in zip(scale, transform["scale"], strict=False)]
    return scale


def _ngff_magnification(ngff: dict) -> float | None:
    """Objective magnification from OME-Zarr metadata, when a writer recorded one."""
    for key in ("magnification", "objective_magnification"):
        value = ngff.get(key)
        if isinstance(value, int | float) and value > 0:
            return float(value)
    text = json.dumps(ngff.get("omero", {}))
    match = re.search(r'"NominalMagnification":\s*([0-9.]+)', text)
    return float(match.group(1)) if match else None
