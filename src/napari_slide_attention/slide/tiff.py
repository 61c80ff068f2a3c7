"""The TIFF family of slides: Aperio SVS, Hamamatsu NDPI, OME-TIFF, generic pyramidal TIFF.

Read through tifffile's zarr view of the file, one dask level per stored pyramid level
chunked at the stored tile (or grouped strip) size. The main series is the pyramid,
the vendor's metadata gives mpp and magnification, named series are the associated
images, and a single-level slide gets virtual lower levels for display.
"""

from __future__ import annotations

import contextlib
import json
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
    UNIT_TO_UM,
    AssociatedImages,
    CheckedLevel,
    LayoutSource,
    lazy_level,
    level_downsample,
    pixel_layout,
    plausible_mpp,
    stored_tile_shape,
)
from .reader import Level, Slide, SlideError

# Virtual levels for single-level slides stop once the largest side fits this.
_VIRTUAL_MIN_SIDE = 2048


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
    page0 = series.keyframe
    # Leave the zarr view's missing tiles as glass (white) on RGB slides.
    axes = series.axes
    dtype = np.dtype(series.dtype)
    metadata, mpp, magnification = _tiff_metadata(path, tif, vendor, page0)
    notes = list(dict.fromkeys(re.sub(r"^<tifffile\.\w+ '[^']*'> ", "", m) for m in log.messages))

    layout = pixel_layout(path, axes, series.shape, dtype)
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
        checked = CheckedLevel(
            path,
            index,
            zarray,
            page=page if single_page else None,
            file_size=file_size if single_page else None,
        )
        native = _native_chunks(page, zarray)
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
# Metadata
# ----------------------------------------------------------------------------------------


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
            mpp = plausible_mpp(path, (float(svs["MPP"]),) * 2, "Aperio MPP", notes)
        if "AppMag" in svs:
            magnification = float(svs["AppMag"])
    elif vendor == "hamamatsu":
        tags = page.ndpi_tags or {}
        metadata.update({k: _jsonable(v) for k, v in tags.items() if k != "McuStarts"})
        mag = tags.get("Magnification")
        if mag is not None and float(mag) > 0:
            magnification = float(mag)
        mpp = plausible_mpp(path, _resolution_mpp(page), "resolution tags", notes)
    elif vendor == "ome-tiff":
        mpp, magnification, ome = _ome_xml_metadata(tif.ome_metadata)
        metadata.update(ome)
        mpp = plausible_mpp(path, mpp, "OME PhysicalSize", notes)
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
                        mpp = plausible_mpp(
                            path, tuple(float(v) for v in pair), "description", notes
                        )
                    if info.get("magnification"):
                        magnification = float(info["magnification"])
        if mpp is None:
            mpp = plausible_mpp(path, _resolution_mpp(page), "resolution tags", notes)
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
        ux = UNIT_TO_UM.get(str(pixels.get("PhysicalSizeXUnit", "µm")))
        uy = UNIT_TO_UM.get(str(pixels.get("PhysicalSizeYUnit", "µm")))
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
        key = next((n for n in ASSOCIATED_NAMES if n in name), None)
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
