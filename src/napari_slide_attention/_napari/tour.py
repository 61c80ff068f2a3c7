"""Camera tours through what a model looked at, as pure functions (no napari, no Qt).

A tour is a list of ``TourStop``: where the camera goes (world centre and zoom), the
level-0 box it shows, and one line saying what the model did there. The Tour panel
steps through them the way a pathologist moves under the microscope.

- ``attention_tour``: a grid-attention result's ``top`` tiles of one attention map,
  highest attention first, each at the magnification the model read it (one screen
  pixel per pixel of the model's input).
- ``sampled_tour``: a dual-attention result's sampled tiles in rank order, each shown
  whole, then that tile's glimpses in the order the hard attention took them.

Coordinates follow ``layers.py``: level-0 pixels in the results, world units (µm, or
pixels without an mpp) = level-0 px · ``scale``, with napari's pixel-centre convention
(a box covering level-0 px x .. x + w - 1 has its middle at x + w/2 - 0.5). napari's
camera zoom is screen pixels per world unit and the same for both axes, so with an
anisotropic pixel size a box is fitted by its larger world side.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .layers import map_ranking

__all__ = [
    "ATTENTION",
    "DETAIL_FILL",
    "HARD_TILE_PX",
    "SAMPLED",
    "TILE_FILL",
    "VIEW_PX",
    "TourStop",
    "attention_tour",
    "box_centre",
    "fit_zoom",
    "map_order",
    "sampled_tour",
    "supported_tours",
]

# The two kinds of tour, as ``supported_tours`` names them.
ATTENTION = "attention"
SAMPLED = "sampled"

# The view the zooms are computed for (screen px of the canvas's smaller side); the panel
# passes its canvas's own size.
VIEW_PX = 1024
# A tile shown whole keeps a margin around it, so its highlight rectangle stays in view.
TILE_FILL = 0.9
# A box looked at in detail (the finest glimpse) fills a third of the view: large enough to
# read its cells, with as much again of its surroundings on each side for context.
DETAIL_FILL = 1 / 3
# HardAttentionConfig.tile_px's default: a dual model's config leaves it out when it kept
# the default (importing the config class would load torch into the viewer).
HARD_TILE_PX = 2048

_DUAL_ARRAYS = ("tile_boxes", "tile_rank", "tile_attention", "tile_classes", "tile_probabilities")
_GLIMPSE_ARRAYS = ("glimpse_boxes", "glimpse_probabilities")


@dataclass(frozen=True)
class TourStop:
    """One stop of a camera tour.

    Attributes:
        centre: world (y, x) the camera centres on.
        zoom: napari camera zoom, screen px per world unit.
        box: level-0 (x, y, w, h) of what is looked at (the highlighted rectangle).
        title: one human line, e.g. "map 3 (#2 for carcinoma), tile 1 of 8: attention 0.85".
        kind: "attention tile", "sampled tile" or "glimpse".
        info: the numbers behind the title (step, rank, attention, class, probability...).
    """

    centre: tuple[float, float]
    zoom: float
    box: tuple[float, float, float, float]
    title: str
    kind: str
    info: dict[str, Any] = field(default_factory=dict)


def box_centre(box: Any, scale: tuple[float, float]) -> tuple[float, float]:
    """Return the world (y, x) middle of a level-0 (x, y, w, h) box.

    The box covers level-0 px x .. x + w - 1; in napari's pixel-centre coordinates its
    middle is x + w/2 - 0.5 (as ``attention_layer_data`` places its cells).
    """
    x, y, w, h = (float(v) for v in box)
    sy, sx = scale
    return (y + h / 2 - 0.5) * sy, (x + w / 2 - 0.5) * sx


def fit_zoom(box: Any, scale: tuple[float, float], fill: float, view_px: float = VIEW_PX) -> float:
    """Return the camera zoom at which the box's larger world side spans ``fill`` of the view.

    Args:
        box: level-0 (x, y, w, h).
        scale: level-0 (y, x) world units per px.
        fill: the share of ``view_px`` the box spans (1 = edge to edge).
        view_px: the smaller side of the canvas in screen px.
    """
    return fill * view_px / _extent(box, scale)


def supported_tours(result: Any) -> tuple[str, ...]:
    """Return the tours a result supports: ``ATTENTION`` (grid maps), ``SAMPLED`` (dual)."""
    if result is None:
        return ()
    tours = []
    if any(getattr(p, "maps", None) is not None for p in getattr(result, "pieces", ())):
        tours.append(ATTENTION)
    if all(name in getattr(result, "arrays", {}) for name in _DUAL_ARRAYS):
        tours.append(SAMPLED)
    return tuple(tours)


def map_order(result: Any) -> list[int]:
    """Return the attention maps' original numbers by their weight in the predicted class.

    The order of ``attention_layer_data``'s map axis: position i of the attention layer
    shows map ``map_order(result)[i]``.

    Raises:
        ValueError: the result has no attention maps.
    """
    return [int(k) for k in map_ranking(result)[0]]


def attention_tour(
    result: Any,
    map_index: int,
    scale: tuple[float, float],
    *,
    top: int = 8,
    view_px: float = VIEW_PX,
) -> list[TourStop]:
    """Return stops at the ``top`` tiles of one attention map, highest attention first.

    Attention is compared as the viewer shows it: each piece's map normalised to a
    maximum of 1 (so every piece's peak ranks high; among equal values the higher raw
    attention comes first). A lattice cell that two pieces' grids share is visited once,
    with its larger value. Cells without attention (off the tissue) are never stops, so
    a small map may give fewer than ``top``.

    Each stop is centred on its tile at the zoom where one screen pixel shows one pixel
    of the model's input: the model read a tile of ``tile_size`` level-0 px (its
    ``tile_um`` µm) into ``input_px`` px, so zoom = input_px / (tile_size · mpp) ≈
    input_px / tile_um (input_px / tile_size without an mpp), capped so that the tile
    fits ``TILE_FILL`` of the view. A result without ``model["config"]["input_px"]`` (a
    run still in progress) shows the tile at ``DETAIL_FILL`` of the view.

    Args:
        result: a grid-attention ``SlideResult`` (or a ``PartialResult``).
        map_index: the map's original number (``map_order`` lists them by weight).
        scale: level-0 (y, x) world units per px (the session's ``scale``).
        top: how many tiles.
        view_px: the smaller side of the canvas in screen px.

    Raises:
        ValueError: the result has no attention maps, ``map_index`` or ``top`` is out of
            range.
    """
    pieces = [p for p in getattr(result, "pieces", ()) if p.maps is not None]
    if not pieces:
        raise ValueError(
            f"{_describe(result)} has no attention maps: the attention tour needs a "
            "grid-attention result"
        )
    n_maps = pieces[0].maps.shape[0]
    if not _is_int(map_index) or not 0 <= map_index < n_maps:
        raise ValueError(
            f"map {map_index!r} is out of range: the result has {n_maps} maps (0..{n_maps - 1})"
        )
    if not _is_int(top) or top < 1:
        raise ValueError(f"top must be a positive number of tiles, got {top!r}")
    map_index = int(map_index)
    order, weights = map_ranking(result)
    rank = int(np.flatnonzero(order == map_index)[0])
    class_name = result.classes[result.predicted]

    # Every attended cell of every piece: (normalised, raw, piece position, row, col).
    cells = []
    for position, piece in enumerate(pieces):
        attention = piece.maps[map_index]
        peak = float(attention.max())
        if peak <= 0:
            continue
        rows, cols = np.nonzero(attention > 0)
        raw = attention[rows, cols].astype(np.float64)
        cells.append((raw / peak, raw, np.full(len(rows), position), rows, cols))
    if not cells:
        return []
    shown, raw, position, rows, cols = (np.concatenate(c) for c in zip(*cells, strict=True))
    # Highest shown value first, then higher raw attention; the rest in reading order.
    ranked = np.lexsort((cols, rows, position, -raw, -shown))

    config = _model_config(result)
    input_px = config.get("input_px")
    chosen = []
    seen: set[tuple[int, int]] = set()
    for j in ranked:
        piece = pieces[position[j]]
        box = piece.tile_box(int(rows[j]), int(cols[j]))
        if box[:2] in seen:
            continue  # a cell two pieces share; its larger value came first
        seen.add(box[:2])
        chosen.append((j, piece, box))
        if len(chosen) == top:
            break

    stops = []
    for step, (j, piece, box) in enumerate(chosen, start=1):
        if input_px:
            zoom = _model_zoom(box, scale, float(input_px), view_px)
        else:
            zoom = fit_zoom(box, scale, DETAIL_FILL, view_px)
        title = (
            f"map {map_index} (#{rank + 1} for {class_name}), tile {step} of {len(chosen)}: "
            f"attention {shown[j]:.2f}"
        )
        info = {
            "step": step,
            "steps": len(chosen),
            "map": map_index,
            "map_rank": rank + 1,
            "map_weight": float(weights[rank]),
            "class": class_name,
            "piece": piece.index,
            "row": int(rows[j]),
            "col": int(cols[j]),
            "attention": float(shown[j]),
            "raw_attention": float(raw[j]),
        }
        stops.append(
            TourStop(
                centre=box_centre(box, scale),
                zoom=zoom,
                box=tuple(float(v) for v in box),
                title=title,
                kind="attention tile",
                info=info,
            )
        )
    return stops


def sampled_tour(
    result: Any,
    scale: tuple[float, float],
    *,
    glimpses: bool = True,
    tiles: int | None = None,
    view_px: float = VIEW_PX,
) -> list[TourStop]:
    """Return stops at a dual-attention result's sampled tiles in rank order, each followed
    by its glimpses.

    A tile is shown whole at the model's tile magnification (one screen pixel per pixel
    of the ``tile_px`` the hard attention read the tile at), capped so that the tile fits
    ``TILE_FILL`` of the view; without the model's config, fitted to ``TILE_FILL``. Its
    T glimpses follow in the order taken, each at the finest magnification (the
    smallest of its boxes), zoomed so that box spans ``DETAIL_FILL`` of the view (about
    a third of a 1024 px view), centred on that box.

    Args:
        result: a dual-attention ``SlideResult``.
        scale: level-0 (y, x) world units per px (the session's ``scale``).
        glimpses: follow each tile with its glimpses.
        tiles: visit only the first ``tiles`` tiles (None: all of them).
        view_px: the smaller side of the canvas in screen px.

    Raises:
        ValueError: the result is not a dual-attention result, or ``tiles`` < 1.
    """
    names = _DUAL_ARRAYS + (_GLIMPSE_ARRAYS if glimpses else ())
    missing = [n for n in names if n not in getattr(result, "arrays", {})]
    if missing:
        raise ValueError(
            f"{_describe(result)} has no {', '.join(missing)}: the sampled-tiles tour needs "
            "a dual-attention result"
        )
    if tiles is not None and (not _is_int(tiles) or tiles < 1):
        raise ValueError(f"tiles must be a positive number or None, got {tiles!r}")
    arrays = {n: np.asarray(result.arrays[n]) for n in names}
    boxes = arrays["tile_boxes"].reshape(-1, 4)
    n_tiles = len(boxes)
    order = np.argsort(arrays["tile_rank"], kind="stable")[: tiles or n_tiles]
    config = _model_config(result)
    tile_px = float((config.get("hard") or {}).get("tile_px", HARD_TILE_PX)) if config else None
    n_glimpses = arrays["glimpse_boxes"].shape[1] if glimpses else 0
    steps = len(order) * (1 + n_glimpses)
    glimpse_scales = list(getattr(result, "info", {}).get("glimpse_scales") or [])

    stops = []
    for i in order:
        tile_rank = int(arrays["tile_rank"][i]) + 1
        box = tuple(float(v) for v in boxes[i])
        tile_class = int(arrays["tile_classes"][i])
        probability = float(arrays["tile_probabilities"][i, tile_class])
        attention = float(arrays["tile_attention"][i])
        zoom = (
            _model_zoom(box, scale, tile_px, view_px)
            if tile_px
            else fit_zoom(box, scale, TILE_FILL, view_px)
        )
        stops.append(
            TourStop(
                centre=box_centre(box, scale),
                zoom=zoom,
                box=box,
                title=(
                    f"tile {tile_rank} of {n_tiles}: attention {attention:.2f}, "
                    f"{result.classes[tile_class]} {probability:.0%}"
                ),
                kind="sampled tile",
                info={
                    "step": len(stops) + 1,
                    "steps": steps,
                    "rank": tile_rank,
                    "attention": attention,
                    "class": result.classes[tile_class],
                    "probability": probability,
                },
            )
        )
        for t in range(n_glimpses):
            fields = arrays["glimpse_boxes"][i, t].reshape(-1, 4)
            finest = int(np.argmin(fields[:, 2]))
            glimpse_box = tuple(float(v) for v in fields[finest])
            step_probabilities = arrays["glimpse_probabilities"][i, t]
            step_class = int(np.argmax(step_probabilities))
            step_probability = float(step_probabilities[step_class])
            stops.append(
                TourStop(
                    centre=box_centre(glimpse_box, scale),
                    zoom=fit_zoom(glimpse_box, scale, DETAIL_FILL, view_px),
                    box=glimpse_box,
                    title=(
                        f"tile {tile_rank} of {n_tiles}, glimpse {t + 1} of {n_glimpses}: "
                        f"{result.classes[step_class]} {step_probability:.0%}"
                    ),
                    kind="glimpse",
                    info={
                        "step": len(stops) + 1,
                        "steps": steps,
                        "rank": tile_rank,
                        "glimpse": t + 1,
                        "glimpses": n_glimpses,
                        "class": result.classes[step_class],
                        "probability": step_probability,
                        "scale": (
                            float(glimpse_scales[finest]) if finest < len(glimpse_scales) else None
                        ),
                    },
                )
            )
    return stops


def _extent(box: Any, scale: tuple[float, float]) -> float:
    """The larger world side of a level-0 (x, y, w, h) box (at least a tiny positive size)."""
    _, _, w, h = (float(v) for v in box)
    sy, sx = scale
    return max(w * sx, h * sy, 1e-12)


def _model_zoom(box: Any, scale: tuple[float, float], model_px: float, view_px: float) -> float:
    """The zoom showing the box at ``model_px`` screen px (the model's magnification),
    capped so that it fits ``TILE_FILL`` of the view."""
    extent = _extent(box, scale)
    return min(model_px / extent, TILE_FILL * view_px / extent)


def _model_config(result: Any) -> dict[str, Any]:
    """The model's config saved with the result ({} without one, e.g. a partial result)."""
    model = getattr(result, "model", None) or {}
    config = model.get("config") if isinstance(model, dict) else None
    return config if isinstance(config, dict) else {}


def _describe(result: Any) -> str:
    """'the result of <slide> (<kind>)', for error messages."""
    slide = getattr(result, "slide", None)
    kind = getattr(result, "model_kind", None)
    if slide is None:
        return f"the result {type(result).__name__}"
    return f"the result of {slide} ({kind})"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
