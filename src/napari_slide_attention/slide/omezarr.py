"""OME-Zarr slides (NGFF 0.4 and 0.5): one dask level per multiscales dataset.

The pixel size comes from the datasets' scale transformations and the axes' units; the
magnification from whatever a writer recorded (top-level keys or OMERO metadata).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
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
)
from .reader import Level, Slide, SlideError

# A level of more chunks than this, or chunks larger than this, is no slide anyone wrote.
_MAX_CHUNKS = 1 << 22
_MAX_CHUNK_BYTES = 256 << 20


def open_ome_zarr(path: Path) -> Slide:
    """Open an OME-Zarr image directory; SlideError when it is not one."""
    try:
        group = zarr.open_group(path, mode="r")
    except Exception as exc:
        raise SlideError(path, f"a directory that is not an OME-Zarr image: {exc}") from exc
    attrs = dict(group.attrs)
    ngff = attrs.get("ome", attrs)  # NGFF 0.5 nests under "ome"; 0.4 is flat
    ngff = ngff if isinstance(ngff, dict) else {}
    multiscales = ngff.get("multiscales")
    if not multiscales:
        raise SlideError(path, "not an OME-Zarr image: the group has no 'multiscales' metadata")
    if not isinstance(multiscales, list) or not isinstance(multiscales[0], dict):
        raise SlideError(path, "damaged OME-Zarr metadata: 'multiscales' is not a list of images")
    ms = multiscales[0]
    datasets = ms.get("datasets") or []
    if not isinstance(datasets, list) or not datasets:
        raise SlideError(path, "OME-Zarr multiscales lists no datasets")
    if not all(isinstance(d, dict) and isinstance(d.get("path"), str) for d in datasets):
        raise SlideError(path, "damaged OME-Zarr metadata: a dataset has no 'path'")
    notes: list[str] = []
    levels: list[da.Array] = []
    infos: list[Level] = []
    sources: list[Any] = []
    layout = None
    names, units = "", {}
    scale0 = None
    for index, dataset in enumerate(datasets):
        try:
            zarray = group[dataset["path"]]
        except Exception as exc:
            raise SlideError(
                path, f"OME-Zarr level {dataset.get('path')!r} is missing: {exc}"
            ) from exc
        if not isinstance(zarray, zarr.Array):
            raise SlideError(path, f"OME-Zarr level {dataset['path']!r} is not an array")
        if layout is None:
            names, units = _ngff_axes(path, ms.get("axes"), zarray.ndim)
            layout = pixel_layout(path, names, zarray.shape, np.dtype(zarray.dtype))
        elif zarray.ndim != len(names):
            raise SlideError(
                path,
                f"damaged OME-Zarr: level {index} has {zarray.ndim} dimensions, not {len(names)}",
            )
        _check_zarr_level(path, index, zarray)
        checked = CheckedLevel(path, index, zarray)
        array = lazy_level(path, index, checked, zarray.chunks, layout)
        if index == 0:
            scale0 = _ngff_scale(dataset, ms, zarray.ndim, notes)
        height, width = array.shape[:2]
        if levels and (height >= levels[-1].shape[0] or width >= levels[-1].shape[1]):
            notes.append(
                f"level {index} ({width}x{height}) is not smaller than the one above; ignored"
            )
            break
        height0, width0 = levels[0].shape[:2] if levels else (height, width)
        yx_axis = names.index("Y"), names.index("X")
        chunks = zarray.chunks
        levels.append(array)
        infos.append(
            Level(
                index=index,
                shape=(height, width),
                downsample=level_downsample((height0, width0), (height, width)),
                tile_shape=(int(chunks[yx_axis[0]]), int(chunks[yx_axis[1]])),
            )
        )
        sources.append(LayoutSource(checked, layout))
    # A missing chunk reads as the fill value, which zarr writers leave out on purpose;
    # a level with none stored, though, is a slide whose data is gone, not a blank one.
    if not _stored_chunks(group[datasets[len(levels) - 1]["path"]]):
        raise SlideError(
            path,
            f"damaged OME-Zarr: level {len(levels) - 1} stores no chunks (its data files are "
            "missing)",
        )
    mpp = None
    if scale0 is not None:
        sy, sx = scale0[names.index("Y")], scale0[names.index("X")]
        unit_y, unit_x = units.get("Y"), units.get("X")
        if unit_x is None and unit_y is None and (sx, sy) != (1.0, 1.0):
            notes.append("OME-Zarr axes have no unit; assumed micrometres")
            unit_x = unit_y = "micrometer"
        factor_x, factor_y = (
            UNIT_TO_UM.get(str(unit_x).lower()),
            UNIT_TO_UM.get(str(unit_y).lower()),
        )
        if factor_x and factor_y:
            mpp = plausible_mpp(path, (sx * factor_x, sy * factor_y), "OME-Zarr scale", notes)
        else:
            notes.append(f"ignored OME-Zarr scale in unknown units ({unit_x!r}, {unit_y!r})")
    associated = {}
    for name in ASSOCIATED_NAMES:
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
        associated=AssociatedImages(path, associated),
        metadata={
            "multiscales": str(ms.get("name") or ""),
            "version": ms.get("version") or ngff.get("version"),
        },
        notes=notes + layout.notes,
        _sources=sources,
        _pages=[None] * len(levels),
    )


def _ngff_axes(path: Path, axes: Any, ndim: int) -> tuple[str, dict[str, Any]]:
    """Axis letters ("CYX") and units by letter; SlideError when they cannot be the array's."""
    if axes is None:
        axes = [{"name": a} for a in "tczyx"[-ndim:]] if ndim <= 5 else []
    if not isinstance(axes, list):
        raise SlideError(path, f"damaged OME-Zarr metadata: axes {axes!r} is not a list")
    names = []
    units: dict[str, Any] = {}
    for axis in axes:
        name = axis.get("name") if isinstance(axis, dict) else axis
        if not isinstance(name, str) or not name:
            raise SlideError(path, f"damaged OME-Zarr metadata: axis {axis!r} has no name")
        letter = name[0].upper()
        names.append(letter)
        units[letter] = axis.get("unit") if isinstance(axis, dict) else None
    if len(names) != ndim:
        raise SlideError(
            path,
            f"damaged OME-Zarr: {len(names)} axes ({''.join(names)}) for arrays of {ndim} "
            "dimensions",
        )
    return "".join(names), units


def _check_zarr_level(path: Path, index: int, zarray: zarr.Array) -> None:
    """Refuse sizes no slide has before dask builds chunk lists for them."""
    shape, chunks = tuple(zarray.shape), tuple(zarray.chunks)
    if any(v < 1 for v in shape) or any(v < 1 for v in chunks):
        raise SlideError(
            path, f"damaged OME-Zarr: level {index} has shape {shape} in chunks of {chunks}"
        )
    count = math.prod(math.ceil(s / c) for s, c in zip(shape, chunks, strict=True))
    chunk_bytes = math.prod(chunks) * np.dtype(zarray.dtype).itemsize
    if count > _MAX_CHUNKS or chunk_bytes > _MAX_CHUNK_BYTES:
        raise SlideError(
            path,
            f"damaged or unsupported OME-Zarr: level {index} of shape {shape} in chunks of "
            f"{chunks} ({count} chunks of {chunk_bytes} bytes)",
        )


def _stored_chunks(zarray: zarr.Array) -> int:
    """How many of an array's chunks are stored (a listing of its directory)."""
    try:
        return int(zarray.nchunks_initialized)
    except Exception:  # a store that cannot be listed: take the chunks on trust
        return 1


def _ngff_scale(dataset: dict, ms: dict, ndim: int, notes: list[str]) -> list[float] | None:
    """The level's scale per axis (its own times the multiscale's), or None (noted)."""
    scale = None
    try:
        for transform in dataset.get("coordinateTransformations") or []:
            if isinstance(transform, dict) and transform.get("type") == "scale":
                scale = [float(v) for v in transform["scale"]]
        for transform in ms.get("coordinateTransformations") or []:
            if isinstance(transform, dict) and transform.get("type") == "scale" and scale:
                scale = [a * float(b) for a, b in zip(scale, transform["scale"], strict=True)]
    except (TypeError, ValueError, KeyError) as exc:
        notes.append(f"ignored unreadable OME-Zarr scale ({exc})")
        return None
    if scale is not None and (len(scale) != ndim or not all(math.isfinite(v) for v in scale)):
        notes.append(f"ignored unreadable OME-Zarr scale {scale}")
        return None
    return scale


def _ngff_magnification(ngff: dict) -> float | None:
    """Objective magnification from OME-Zarr metadata, when a writer recorded one."""
    for key in ("magnification", "objective_magnification"):
        value = ngff.get(key)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if number and math.isfinite(value) and value > 0:
            return float(value)
    text = json.dumps(ngff.get("omero", {}))
    match = re.search(r'"NominalMagnification":\s*([0-9]+(?:\.[0-9]*)?)', text)
    return float(match.group(1)) if match and float(match.group(1)) > 0 else None
