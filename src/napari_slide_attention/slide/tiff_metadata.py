"""The vendor metadata of a TIFF-family slide: pixel size, magnification, the rest as a dict.

Aperio puts them in the ImageDescription (``MPP = 0.499|AppMag = 20``), Hamamatsu in its
own tags and the resolution tags, OME-TIFF in its XML, generic TIFFs in the resolution
tags or a JSON description. A value that cannot be read (``AppMag = xx``, ``MPP =
abcdef``, an ``mpp`` of ``[0.5]`` or ``null``) is left out with a note: the pixels are
fine, so the slide opens, as it does without a pixel size.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from .levels import UNIT_TO_UM, plausible_mpp


def tiff_metadata(
    path: Path, tif: tifffile.TiffFile, vendor: str, page: tifffile.TiffPage
) -> tuple[dict[str, Any], tuple[float, float] | None, float | None]:
    """The vendor's metadata as a flat dict, mpp (x, y) in µm and the magnification.

    What cannot be read is noted under ``metadata["notes"]`` and left out.
    """
    metadata: dict[str, Any] = {}
    notes: list[str] = []
    mpp = magnification = None
    try:
        if vendor == "aperio":
            mpp, magnification = _aperio(path, page, metadata, notes)
        elif vendor == "hamamatsu":
            tags = page.ndpi_tags or {}
            metadata.update({k: _jsonable(v) for k, v in tags.items() if k != "McuStarts"})
            magnification = _magnification(tags.get("Magnification"), "NDPI Magnification", notes)
            mpp = plausible_mpp(path, _resolution_mpp(page), "resolution tags", notes)
        elif vendor == "ome-tiff":
            mpp, magnification = _ome_xml_metadata(tif.ome_metadata, metadata, notes)
            mpp = plausible_mpp(path, mpp, "OME PhysicalSize", notes)
        else:
            mpp, magnification = _generic(path, page, metadata, notes)
    except Exception as exc:  # a parser of vendor text meeting text it does not expect
        notes.append(f"ignored unreadable {vendor} metadata ({type(exc).__name__}: {exc})")
    if notes:
        metadata["notes"] = notes
    return metadata, mpp, magnification


def _aperio(path: Path, page, metadata: dict, notes: list[str]):
    svs = tifffile.tifffile.svs_description_metadata(page.description)
    metadata.update({k: v for k, v in svs.items() if k != "Header"})
    metadata["Header"] = str(svs.get("Header", "")).strip()
    mpp = magnification = None
    if "MPP" in svs:
        mpp = plausible_mpp(path, _mpp_pair(svs["MPP"], "Aperio MPP", notes), "Aperio MPP", notes)
    if "AppMag" in svs:
        magnification = _magnification(svs["AppMag"], "Aperio AppMag", notes)
    return mpp, magnification


def _generic(path: Path, page, metadata: dict, notes: list[str]):
    mpp = magnification = None
    desc = page.description or ""
    if desc.startswith("{"):
        with contextlib.suppress(ValueError):
            info = json.loads(desc)
            if isinstance(info, dict):
                metadata.update({k: v for k, v in info.items() if k != "shape"})
                if "mpp" in info:
                    pair = _mpp_pair(info["mpp"], "description mpp", notes)
                    mpp = plausible_mpp(path, pair, "description", notes)
                if info.get("magnification"):
                    magnification = _magnification(
                        info["magnification"], "description magnification", notes
                    )
    if mpp is None:
        mpp = plausible_mpp(path, _resolution_mpp(page, notes), "resolution tags", notes)
    for name in ("Make", "Model", "Software"):
        value = page.tags.valueof(name)
        if value:
            metadata[name] = str(value)
    return mpp, magnification


def _number(value: Any, what: str, notes: list[str]) -> float | None:
    """A finite number from metadata text or values, or None (noted)."""
    if isinstance(value, bool):
        value = None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        notes.append(f"ignored unreadable {what} {value!r}")
        return None
    if not math.isfinite(number):
        notes.append(f"ignored unreadable {what} {value!r}")
        return None
    return number


def _mpp_pair(value: Any, what: str, notes: list[str]) -> tuple[float, float] | None:
    """(x, y) from one number or a pair of them, or None (noted)."""
    if isinstance(value, list | tuple):
        if len(value) != 2:
            notes.append(f"ignored unreadable {what} {value!r} (not one number or an x, y pair)")
            return None
        pair = [_number(v, what, notes) for v in value]
        return None if None in pair else (pair[0], pair[1])
    number = _number(value, what, notes)
    return None if number is None else (number, number)


def _magnification(value: Any, what: str, notes: list[str]) -> float | None:
    """An objective magnification, or None when absent, unreadable or not positive."""
    if value is None:
        return None
    number = _number(value, what, notes)
    if number is None or number <= 0:
        return None
    return number


def _resolution_mpp(page, notes: list[str] | None = None) -> tuple[float, float] | None:
    """Micrometres per pixel from the TIFF resolution tags, or None when absent or unitless."""
    notes = [] if notes is None else notes
    unit = page.tags.valueof("ResolutionUnit")
    xres, yres = page.tags.valueof("XResolution"), page.tags.valueof("YResolution")
    try:
        unit = int(unit) if unit is not None else None
    except (TypeError, ValueError):
        notes.append(f"ignored unreadable ResolutionUnit {unit!r}")
        return None
    if unit is None or unit == 1 or not xres or not yres:
        return None
    if unit not in (2, 3):
        notes.append(f"ignored resolution tags of unknown unit {unit}")
        return None
    um_per_unit = 1e4 if unit == 3 else 25400.0

    def ratio(value) -> float:
        if isinstance(value, tuple) and len(value) == 2:
            return value[0] / value[1] if value[1] else 0.0
        return _number(value, "resolution", notes) or 0.0

    x, y = ratio(xres), ratio(yres)
    if not (x > 0 and y > 0 and math.isfinite(x) and math.isfinite(y)):
        return None
    return (um_per_unit / x, um_per_unit / y)


def _ome_xml_metadata(xml: str | None, metadata: dict, notes: list[str]):
    if not xml:
        return None, None
    try:
        ome = tifffile.xml2dict(xml)["OME"]
    except Exception:
        notes.append("ignored unreadable OME-XML")
        return None, None
    images = ome.get("Image", {})
    image = images[0] if isinstance(images, list) and images else images
    image = image if isinstance(image, dict) else {}
    pixels = image.get("Pixels", {})
    pixels = pixels if isinstance(pixels, dict) else {}
    metadata["Name"] = image.get("Name")
    mpp = None
    if "PhysicalSizeX" in pixels and "PhysicalSizeY" in pixels:
        ux = UNIT_TO_UM.get(str(pixels.get("PhysicalSizeXUnit", "µm")))
        uy = UNIT_TO_UM.get(str(pixels.get("PhysicalSizeYUnit", "µm")))
        sx = _number(pixels["PhysicalSizeX"], "OME PhysicalSizeX", notes)
        sy = _number(pixels["PhysicalSizeY"], "OME PhysicalSizeY", notes)
        if ux and uy and sx is not None and sy is not None:
            mpp = (sx * ux, sy * uy)
    magnification = None
    instrument = ome.get("Instrument", {})
    instrument = instrument[0] if isinstance(instrument, list) and instrument else instrument
    objective = instrument.get("Objective", {}) if isinstance(instrument, dict) else {}
    objective = objective[0] if isinstance(objective, list) and objective else objective
    if isinstance(objective, dict) and objective.get("NominalMagnification"):
        magnification = _magnification(
            objective["NominalMagnification"], "OME NominalMagnification", notes
        )
        metadata["Objective"] = objective.get("Model") or objective.get("ID")
    for key in ("PhysicalSizeX", "PhysicalSizeY", "PhysicalSizeXUnit", "PhysicalSizeYUnit"):
        if key in pixels:
            metadata[key] = pixels[key]
    return mpp, magnification


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= 16 else f"array{value.shape}"
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    return value
