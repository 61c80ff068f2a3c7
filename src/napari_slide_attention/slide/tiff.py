"""The TIFF family of slides: Aperio SVS, Hamamatsu NDPI, OME-TIFF, generic pyramidal TIFF.

Read through tifffile's zarr view of the file, one dask level per stored pyramid level
chunked at the stored tile (or grouped strip) size. The main series is the pyramid,
the vendor's metadata gives mpp and magnification, named series are the associated
images, and a single-level slide gets virtual lower levels for display.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import tifffile
import zarr

from .levels import (
    ASSOCIATED_NAMES,
    AssociatedImages,
    CheckedLevel,
    LayoutSource,
    lazy_level,
    level_downsample,
    pixel_layout,
    stored_tile_shape,
)
from .reader import Level, Slide, SlideError
from .tiff_checks import check_level, header_bytes
from .tiff_metadata import tiff_metadata

# Virtual levels for single-level slides stop once the largest side fits this.
_VIRTUAL_MIN_SIDE = 2048
# Stored tiles or strips grouped into one dask chunk stay under this.
_MAX_CHUNK_BYTES = 64 << 20


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


def open_tiff(path: Path) -> Slide:
    """Open a TIFF-family slide; SlideError names what is wrong with a file that is not one."""
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
    stored_levels, level_notes = _checked_levels(path, tif, series, file_size)
    page0 = series.keyframe
    axes = series.axes
    dtype = np.dtype(series.dtype)
    metadata, mpp, magnification = tiff_metadata(path, tif, vendor, page0)
    notes = list(dict.fromkeys(re.sub(r"^<tifffile\.\w+ '[^']*'> ", "", m) for m in log.messages))
    notes += level_notes + metadata.get("notes", [])  # unreadable values show in `info`

    layout = pixel_layout(path, axes, series.shape, dtype)
    # Tiles a file does not store (sparse) read as glass (white) on RGB slides.
    fill = 255 if layout.rgb else 0
    store = series.aszarr(fillvalue=fill)
    root = zarr.open(store, mode="r")
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
        single_page = len(level_series) == 1 and page.planarconfig == 1
        checked = CheckedLevel(
            path,
            index,
            zarray,
            page=page if single_page else None,
            file_size=file_size if single_page else None,
        )
        native = _native_chunks(page, zarray, axes)
        array = lazy_level(path, index, checked, native, layout)
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
                downsample=level_downsample((height0, width0), (height, width)),
                tile_shape=stored_tile_shape(page),
                virtual=False,
            )
        )
        sources.append(LayoutSource(checked, layout))
        pages.append(page if single_page and layout.native else None)

    if len(levels) == 1:
        _add_virtual_levels(levels, infos, sources, pages)

    associated = _tiff_associated(path, tif, all_series, series, file_size, notes)
    slide = Slide(
        path=path,
        vendor=vendor,
        levels=levels,
        level_info=infos,
        mpp=mpp,
        mpp_source="metadata" if mpp else None,
        magnification=magnification,
        rgb=layout.rgb,
        associated=AssociatedImages(path, associated),
        metadata=metadata,
        notes=notes + layout.notes,
        _sources=sources,
        _pages=pages,
        _closers=[tif.close],
    )
    return slide


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
    candidates = [s for s in all_series if (s.name or "").lower() not in ASSOCIATED_NAMES]
    candidates = candidates or list(all_series)
    return max(candidates, key=lambda s: (s.size, -all_series.index(s)))


def _checked_levels(
    path: Path, tif: tifffile.TiffFile, series: tifffile.TiffPageSeries, file_size: int
) -> tuple[list[tifffile.TiffPageSeries], list[str]]:
    """The pyramid's levels whose directories fit the file (``tiff_checks``), and notes.

    A damaged level 0 refuses the slide; a damaged lower level is dropped with the
    levels below it (noted), as the pixels of the levels above are still right.
    """
    header = header_bytes(tif)
    levels: list[tifffile.TiffPageSeries] = []
    notes: list[str] = []
    for index, level in enumerate(series.levels):
        try:
            notes += check_level(path, index, level, file_size, header)
        except SlideError as exc:
            if index == 0:
                raise
            notes.append(f"level {index} and below ignored: {exc.problem}")
            break
        levels.append(level)
    return levels, notes


def _native_chunks(page: tifffile.TiffPage, zarray, axes: str) -> tuple[int, ...]:
    """dask chunks: the zarr view's (the stored tiles or strips), small ones grouped.

    Strips are grouped to >= 256 rows and tiles under 256 px to >= 256 px a side, so a
    file of thin strips or tiny tiles does not make millions of chunks; a group stays
    under ``_MAX_CHUNK_BYTES`` (one stored tile or strip at least).
    """
    chunks = list(zarray.chunks)
    shape = zarray.shape
    row_axis, col_axis = axes.upper().index("Y"), axes.upper().index("X")
    itemsize = np.dtype(zarray.dtype).itemsize
    for axis in (row_axis, col_axis) if page.is_tiled else (row_axis,):
        if chunks[axis] >= 256:
            continue
        grouped = min(shape[axis], chunks[axis] * math.ceil(256 / chunks[axis]))
        others = math.prod(chunks) // chunks[axis] * itemsize
        fits = max(1, _MAX_CHUNK_BYTES // max(1, others * chunks[axis]))
        chunks[axis] = min(grouped, chunks[axis] * fits)
    return tuple(chunks)


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
                downsample=level_downsample((height0, width0), (height, width)),
                tile_shape=None,
                virtual=True,
            )
        )
        sources.append(_DaskSource(current))
        pages.append(None)


# ----------------------------------------------------------------------------------------
# Associated images
# ----------------------------------------------------------------------------------------


def _tiff_associated(
    path: Path, tif, all_series, main, file_size: int, notes: list[str]
) -> dict[str, Any]:
    """Associated images of a TIFF slide by name: readers that decode on first access.

    One whose directory cannot be right or whose data is cut short (``tiff_checks``) is
    left out with a note, so reading it can neither fail later nor allocate what the
    file cannot hold.
    """
    found: dict[str, Any] = {}
    for series in all_series:
        if series is main:
            continue
        name = (series.name or "").strip().lower()
        key = next((n for n in ASSOCIATED_NAMES if n in name), None)
        if key is None or key in found:
            continue
        try:
            level_notes = check_level(path, 0, series, file_size, header_bytes(tif))
        except SlideError as exc:
            problem = exc.problem
        else:  # cut short: reading it would fail later, and the slide does not need it
            problem = next((n for n in level_notes if "beyond the end" in n), "")
        if problem:
            notes.append(f"{key} image ignored: {problem.replace('level 0', f'the {key} image')}")
            continue
        found[key] = _series_reader(series)
    return found


def _series_reader(series):
    lock = threading.Lock()

    def read() -> np.ndarray:
        with lock:
            return series.asarray()

    return read
