"""OME-Zarr slides (NGFF 0.4 and 0.5): one dask level per multiscales dataset.

The pixel size comes from the datasets' scale transformations and the axes' units; the
magnification from whatever a writer recorded (top-level keys or OMERO metadata).
"""

from __future__ import annotations

import json
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


def open_ome_zarr(path: Path) -> Slide:
    """Open an OME-Zarr image directory; SlideError when it is not one."""
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
            layout = pixel_layout(path, names, zarray.shape, np.dtype(zarray.dtype))
        checked = CheckedLevel(path, index, zarray)
        array = lazy_level(path, index, checked, zarray.chunks, layout)
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
                downsample=level_downsample((height0, width0), (height, width)),
                tile_shape=(int(chunks[yx_axis[0]]), int(chunks[yx_axis[1]])),
            )
        )
        sources.append(LayoutSource(checked, layout))
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
