"""The label store's exchange formats: QuPath GeoJSON in and out, CSV out.

GeoJSON regions are Polygon features in level-0 px with QuPath's ``classification`` and
a stable ``id``, so a file that went to QuPath and back updates its regions instead of
copying them; QuPath's bare feature lists, MultiPolygons and single Features are read
too. The store's ``export_geojson``, ``import_geojson`` and ``export_csv`` gather and
apply the regions; these functions write and read the files.
"""

from __future__ import annotations

import csv
import json
import os
import uuid
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import atomic_write_text, written_atomically
from .records import (
    REGION_KINDS,
    UNCLASSIFIED,
    LabelStoreError,
    Region,
    SlideLabel,
    Vertex,
    check_geometry,
)

CSV_COLUMNS = (
    "slide",
    "kind",
    "id",
    "label",
    "status",
    "author",
    "time",
    "note",
    "x",
    "y",
    "w",
    "h",
    "geometry",
)


def write_geojson(path: str | os.PathLike, regions: Iterable[tuple[Region, str]]) -> int:
    """Write regions as a QuPath-compatible FeatureCollection; gives the number written.

    Args:
        path: the file to write (replaced atomically).
        regions: each region with its stable id (the feature's ``id``).
    """
    features = []
    for region, region_uuid in regions:
        ring = [[x, y] for x, y in region.geometry]
        features.append(
            {
                "type": "Feature",
                "id": region_uuid,
                "geometry": {"type": "Polygon", "coordinates": [[*ring, ring[0]]]},
                "properties": {
                    "objectType": "annotation",
                    "classification": {
                        "name": region.label,
                        "color": _label_colour(region.label),
                    },
                    "isLocked": False,
                    "name": region.note,
                    "metadata": {
                        "slide": region.slide,
                        "author": region.author,
                        "time": region.time,
                        "kind": region.kind,
                        "id": str(region.id),
                    },
                },
            }
        )
    atomic_write_text(
        Path(path), json.dumps({"type": "FeatureCollection", "features": features}, indent=1)
    )
    return len(features)


def write_csv(
    path: str | os.PathLike,
    labels: dict[str, SlideLabel],
    regions: dict[str, list[Region]],
) -> int:
    """Write one row per slide label and per region, slide by slide; gives the number of rows.

    Args:
        path: the file to write (replaced atomically); columns ``CSV_COLUMNS``.
        labels: slide labels by slide key.
        regions: regions by slide key.
    """
    rows: list[list[Any]] = []
    for key in sorted(set(labels) | set(regions)):
        if key in labels:
            lab = labels[key]
            rows.append(
                [key, "slide", "", lab.label, lab.status, lab.author, lab.time, lab.note] + [""] * 5
            )
        for region in regions.get(key, []):
            rows.append(
                [
                    key,
                    region.kind,
                    region.id,
                    region.label,
                    "",
                    region.author,
                    region.time,
                    region.note,
                    *region.box,
                    json.dumps([list(v) for v in region.geometry]),
                ]
            )
    with written_atomically(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(rows)
    return len(rows)


def _label_colour(label: str) -> list[int]:
    """A stable colour per class name (QuPath shows classes by colour)."""
    palette = [
        (230, 25, 75),
        (60, 180, 75),
        (0, 130, 200),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
        (240, 50, 230),
        (210, 245, 60),
        (0, 128, 128),
        (170, 110, 40),
        (128, 0, 0),
        (0, 0, 128),
    ]
    # crc32, not hash(): Python salts str hashes per process, the colours must not change
    return list(palette[zlib.crc32(label.encode()) % len(palette)])


# -- GeoJSON reading -----------------------------------------------------------------------
@dataclass
class ImportedRegion:
    """A region read from a GeoJSON file, before it is added to a store.

    Attributes:
        feature: the index of its feature in the file (named in errors).
        geometry: checked (x, y) vertices in level-0 px.
        label: the class name ("unclassified" without one).
        kind: "rectangle" or "polygon", or the kind our own export recorded.
        note: QuPath's ``name`` ("" without one).
        uuid: the feature's id (a region exported from a store keeps its own), or None.
    """

    feature: int
    geometry: tuple[Vertex, ...]
    label: str
    kind: str
    note: str
    uuid: str | None


_NO_AREA = ("Point", "MultiPoint", "LineString", "MultiLineString")


def _exterior_rings(geometry: Any, path: Path, where: str) -> list[Any] | None:
    """The exterior rings of a geometry; None when it has no area (points, lines)."""
    if not isinstance(geometry, dict) or "type" not in geometry:
        raise LabelStoreError(path, f"{where}: the geometry is not a GeoJSON object")
    kind = geometry["type"]
    if kind in _NO_AREA:
        return None
    if kind == "GeometryCollection":
        rings = []
        for part in geometry.get("geometries") or []:
            rings += _exterior_rings(part, path, where) or []
        return rings or None
    coordinates = geometry.get("coordinates")
    if kind == "Polygon":
        polygons = [coordinates]
    elif kind == "MultiPolygon":
        polygons = coordinates
    else:
        raise LabelStoreError(path, f"{where}: unknown geometry type {kind!r}")
    if not isinstance(polygons, list) or not all(
        isinstance(p, list) and p and isinstance(p[0], list) for p in polygons
    ):
        raise LabelStoreError(path, f"{where}: {kind} coordinates are not lists of rings")
    return [polygon[0] for polygon in polygons]


def read_geojson(path: Path) -> tuple[list[ImportedRegion], int]:
    """The regions in a GeoJSON file and the number of features skipped (no area)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise LabelStoreError(path, "no such GeoJSON file") from None
    except json.JSONDecodeError as exc:
        raise LabelStoreError(
            path, f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelStoreError(path, f"cannot read the file ({exc})") from exc
    if isinstance(data, list):  # QuPath's "bare list of features" export
        features = data
    elif isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
        if not isinstance(features, list):
            raise LabelStoreError(path, "the FeatureCollection has no list of features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    else:
        found = data.get("type") if isinstance(data, dict) else type(data).__name__
        raise LabelStoreError(
            path,
            f"not GeoJSON features (a FeatureCollection or a list of Features), found {found!r}",
        )
    regions: list[ImportedRegion] = []
    skipped = 0
    for n, feature in enumerate(features):
        where = f"feature {n}"
        if not isinstance(feature, dict) or feature.get("type", "Feature") != "Feature":
            found = feature.get("type") if isinstance(feature, dict) else type(feature).__name__
            raise LabelStoreError(path, f"{where} is a {found!r}, not a Feature")
        geometry = feature.get("geometry")
        rings = None if geometry is None else _exterior_rings(geometry, path, where)
        if not rings:
            skipped += 1
            continue
        properties = feature.get("properties") or {}
        if not isinstance(properties, dict):
            raise LabelStoreError(path, f"{where}: properties are not an object")
        classification = properties.get("classification")
        # some exporters write the class name alone instead of QuPath's object
        label = classification.get("name") if isinstance(classification, dict) else classification
        label = str(label).strip() if label is not None else ""
        metadata = properties.get("metadata")
        metadata = metadata if isinstance(metadata, dict) else {}
        note = properties.get("name")
        feature_id = feature.get("id")
        for k, ring in enumerate(rings):
            try:
                # a third coordinate (z) is allowed by GeoJSON; regions are 2-D
                vertices = [point[:2] for point in ring]
                kind = metadata.get("kind")
                checked = check_geometry(vertices, "polygon")
                if kind not in REGION_KINDS or (kind != "polygon" and len(checked) != 4):
                    kind = "rectangle" if _is_axis_rectangle(checked) else "polygon"
            except (TypeError, ValueError) as exc:
                raise LabelStoreError(path, f"{where}: {exc}") from None
            region_uuid = None
            if feature_id is not None:
                # each part of a MultiPolygon gets its own stable id
                region_uuid = (
                    str(feature_id)
                    if len(rings) == 1
                    else str(uuid.uuid5(uuid.NAMESPACE_URL, f"{feature_id}#{k}"))
                )
            regions.append(
                ImportedRegion(
                    n,
                    checked,
                    label or UNCLASSIFIED,
                    kind,
                    str(note) if note is not None else "",
                    region_uuid,
                )
            )
    return regions, skipped


def _is_axis_rectangle(vertices: Sequence[Vertex]) -> bool:
    if len(vertices) != 4:
        return False
    xs = {x for x, _ in vertices}
    ys = {y for _, y in vertices}
    return len(xs) == 2 and len(ys) == 2 and len(set(vertices)) == 4
