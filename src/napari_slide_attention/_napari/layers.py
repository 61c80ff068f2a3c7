"""Pure functions from slides and model results to napari layer data tuples.

Tested without a viewer. One place decides coordinates: slide level-0 pixels,
shown in micrometres with the slide's mpp (pixels when the mpp is unknown).
``result_layer_data`` gives every overlay of a result by role; the session (after a
run, or a result opened from the Model panel) and the reader (a dropped result folder)
both show a result through it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..slide.reader import Slide


def slide_scale(slide: Slide) -> tuple[tuple[float, float], tuple[str, str]]:
    """Return the (y, x) scale of level 0 and its units, µm when known, else pixels."""
    if slide.mpp is None:
        return (1.0, 1.0), ("pixel", "pixel")
    return (slide.mpp[1], slide.mpp[0]), ("µm", "µm")


def result_scale(result: Any) -> tuple[tuple[float, float], tuple[str, str]]:
    """Return the (y, x) scale and units of the slide a result was made on (its
    ``slide_info["mpp"]``), for showing a result whose slide is not open."""
    mpp = (getattr(result, "slide_info", None) or {}).get("mpp")
    if not mpp:
        return (1.0, 1.0), ("pixel", "pixel")
    return (float(mpp[1]), float(mpp[0])), ("µm", "µm")


def slide_layer_data(slide: Slide, name: str | None = None) -> list[tuple[Any, dict, str]]:
    """Return the layer data tuple(s) that show a slide as one multiscale image.

    RGB slides give one RGB layer; multichannel slides one layer per channel
    (napari's ``channel_axis``); grayscale ones a single-channel layer.
    """
    scale, units = slide_scale(slide)
    metadata = {
        "slide": slide,  # widgets reach the associated images and the reader through this
        "path": str(slide.path),
        "vendor": slide.vendor,
        "mpp": slide.mpp,
        "magnification": slide.magnification,
        "associated": slide.associated,
        "slide_metadata": slide.metadata,
    }
    kwargs: dict[str, Any] = {
        "name": name or slide.path.name,
        "multiscale": True,
        "scale": scale,
        "units": units,
        "axis_labels": ("y", "x"),
        "metadata": metadata,
    }
    if slide.rgb:
        kwargs["rgb"] = True
    else:
        kwargs["rgb"] = False
        kwargs["contrast_limits"] = _contrast_limits(slide)
        if slide.channels > 1:
            kwargs["channel_axis"] = 2
            kwargs["name"] = [f"{kwargs['name']} [{i}]" for i in range(slide.channels)]
            kwargs["contrast_limits"] = [kwargs["contrast_limits"]] * slide.channels
            kwargs["blending"] = "additive"
    return [(list(slide.levels), kwargs, "image")]


def _contrast_limits(slide: Slide) -> tuple[float, float]:
    """Contrast limits from the smallest level, so napari never scans level 0 for them."""
    smallest = np.asarray(slide.levels[-1])
    low, high = np.percentile(smallest, (0.5, 99.5)) if smallest.size else (0, 1)
    if high <= low:
        high = low + 1
    return float(low), float(high)


def attention_layer_data(
    result: Any, scale: tuple[float, float], units: tuple[str, str] = ("µm", "µm")
) -> tuple[np.ndarray, dict, str]:
    """The m attention maps of a grid-attention result as one image layer over the slide.

    All tissue pieces' grids lie on the slide-wide lattice (origins are multiples of the
    tile size), so their maps are placed into one (m, rows, cols) array at grid
    resolution, shown with ``scale`` = tile size and ``translate`` = the lattice origin
    (in µm), never up-sampled to slide resolution. Each piece's maps are normalised to a
    maximum of 1 (the paper's Figure 5). Maps are ordered by their contribution to the
    predicted class's score (W[c, k]·z_k summed over pieces), strongest first; the
    original map numbers are in ``metadata["map_order"]``.

    Args:
        result: a grid-attention ``SlideResult``.
        scale: level-0 (y, x) µm per pixel of the slide layer.
        units: the slide layer's units.
    """
    pieces = [p for p in result.pieces if p.maps is not None]
    if not pieces:
        raise ValueError("the result has no attention maps")
    stacks = []
    for p in pieces:
        peak = p.maps.max(axis=(1, 2), keepdims=True)
        stacks.append(np.divide(p.maps, peak, out=np.zeros_like(p.maps), where=peak > 0))
    data, tile, (r0, c0), translate, cell = _on_lattice(pieces, stacks, scale)  # (m, rows, cols)
    order, weights = map_ranking(result)
    kwargs = {
        "name": f"attention maps ({result.predicted_class})",
        "scale": (1.0, *cell),
        "translate": (0.0, *translate),
        "units": ("pixel", *units),
        "axis_labels": ("map", "y", "x"),
        "colormap": "inferno",
        "opacity": 0.55,
        "blending": "additive",  # cells with no attention (0 = black) leave the slide as is
        "contrast_limits": (0.0, 1.0),
        "metadata": {
            "map_order": order.tolist(),
            "map_weights": weights.tolist(),
            "classes": list(result.classes),
            "predicted": result.predicted_class,
            "tile_size": int(tile),
            "origin": (int(c0 * tile), int(r0 * tile)),
        },
    }
    return data[order], kwargs, "image"


def _on_lattice(
    pieces: list[Any], stacks: list[np.ndarray], scale: tuple[float, float]
) -> tuple[np.ndarray, int, tuple[int, int], tuple[float, float], tuple[float, float]]:
    """Place each piece's (n, H', W') grid arrays into one (n, rows, cols) array on the
    slide-wide tile lattice (the maximum where neighbouring pieces' grids share cells).

    Returns:
        The array, the tile size, the lattice (row, col) of its first cell, and the world
        (y, x) translate and scale of a layer showing it (one pixel per cell).

    Raises:
        ValueError: the pieces' grids have different tile sizes.
    """
    tile = pieces[0].tile_size
    if any(p.tile_size != tile for p in pieces):
        raise ValueError("the pieces' grids have different tile sizes")
    r0 = min(p.grid_origin[1] // tile for p in pieces)
    c0 = min(p.grid_origin[0] // tile for p in pieces)
    r1 = max(p.grid_origin[1] // tile + a.shape[1] for p, a in zip(pieces, stacks, strict=True))
    c1 = max(p.grid_origin[0] // tile + a.shape[2] for p, a in zip(pieces, stacks, strict=True))
    data = np.zeros((stacks[0].shape[0], r1 - r0, c1 - c0), dtype=np.float32)
    for p, a in zip(pieces, stacks, strict=True):
        r, c = p.grid_origin[1] // tile - r0, p.grid_origin[0] // tile - c0
        h, w = a.shape[1:]
        region = data[:, r : r + h, c : c + w]
        np.maximum(region, a, out=region)
    sy, sx = scale
    # A cell covers level-0 px [a, a + tile); its centre in napari's pixel-centre world
    # coordinates is (a + tile / 2 - 0.5) * mpp.
    translate = ((r0 * tile + tile / 2 - 0.5) * sy, (c0 * tile + tile / 2 - 0.5) * sx)
    return data, int(tile), (int(r0), int(c0)), translate, (tile * sy, tile * sx)


def tile_probabilities_layer_data(
    result: Any, scale: tuple[float, float], units: tuple[str, str] = ("µm", "µm")
) -> tuple[np.ndarray, dict, str]:
    """The tile class probabilities of a sliding-window result as one image over the slide.

    One slice per class (the slider picks the class), each piece's
    ``arrays["tile_probabilities"]`` (C, H', W') placed on the slide-wide tile lattice at
    grid resolution like the attention maps; tiles off the tissue (NaN) show as 0.

    Args:
        result: a sliding-window ``SlideResult`` (or a ``PartialResult``).
        scale: level-0 (y, x) µm per pixel of the slide layer.
        units: the slide layer's units.

    Raises:
        ValueError: the result has no tile probabilities.
    """
    pieces = [p for p in result.pieces if "tile_probabilities" in p.arrays]
    if not pieces:
        raise ValueError(f"the result of {result.slide} has no tile probabilities")
    stacks = [
        np.nan_to_num(np.asarray(p.arrays["tile_probabilities"], np.float32), nan=0.0)
        for p in pieces
    ]
    data, tile, (r0, c0), translate, cell = _on_lattice(pieces, stacks, scale)  # (C, rows, cols)
    kwargs = {
        "name": f"tile probabilities ({result.predicted_class})",
        "scale": (1.0, *cell),
        "translate": (0.0, *translate),
        "units": ("pixel", *units),
        "axis_labels": ("class", "y", "x"),
        "colormap": "viridis",
        "opacity": 0.5,
        "blending": "additive",
        "contrast_limits": (0.0, 1.0),
        "metadata": {
            "classes": list(result.classes),
            "predicted": result.predicted_class,
            "predicted_index": int(result.predicted),
            "tile_size": tile,
            "origin": (c0 * tile, r0 * tile),
        },
    }
    return data, kwargs, "image"


def map_ranking(result: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return the attention maps' numbers, strongest first, and their weights in that order.

    A map's weight is its contribution to the predicted class's score, W[c, k]·z_k summed
    over the pieces with maps (``arrays["map_contributions"]``); without contributions
    all weights are 0 and the maps keep their own order.

    Args:
        result: a grid-attention ``SlideResult`` (or a ``PartialResult``).

    Raises:
        ValueError: the result has no attention maps.
    """
    pieces = [p for p in result.pieces if p.maps is not None]
    if not pieces:
        raise ValueError("the result has no attention maps")
    weights = np.zeros(pieces[0].maps.shape[0])
    for p in pieces:
        contributions = p.arrays.get("map_contributions")
        if contributions is not None:
            weights += contributions[result.predicted]
    order = np.argsort(-weights, kind="stable")
    return order, weights[order]


# Tile classes get these edge colours in class order (colour-blind safe, Okabe-Ito).
CLASS_COLOURS = (
    "#0072b2",  # blue
    "#009e73",  # green
    "#e69f00",  # orange
    "#d55e00",  # vermilion
    "#cc79a7",  # purple
    "#56b4e9",  # sky blue
    "#f0e442",  # yellow
    "#000000",
)


def boxes_to_rectangles(boxes: Any, scale: tuple[float, float]) -> list[np.ndarray]:
    """Level-0 (x, y, w, h) boxes -> napari rectangles (4 corners, (y, x)) in world units.

    A box covers level-0 pixels x .. x + w - 1; with napari's pixel-centre coordinates
    its outer edges lie half a pixel before the first and after the last pixel.
    """
    sy, sx = scale
    rects = []
    for x, y, w, h in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        top, left, bottom, right = y - 0.5, x - 0.5, y + h - 0.5, x + w - 0.5
        corners = [[top, left], [top, right], [bottom, right], [bottom, left]]
        rects.append(np.array(corners) * [sy, sx])
    return rects


def _class_colours(indices: np.ndarray) -> np.ndarray:
    """(n, 4) RGBA rows: each class index's colour from ``CLASS_COLOURS``."""
    palette = np.array(
        [[int(c[i : i + 2], 16) / 255 for i in (1, 3, 5)] + [1.0] for c in CLASS_COLOURS]
    )
    return palette[np.asarray(indices, dtype=np.int64) % len(palette)].reshape(-1, 4)


def _dual_arrays(result: Any, *names: str) -> list[np.ndarray]:
    missing = [n for n in names if n not in result.arrays]
    if missing:
        raise ValueError(
            f"the result of {result.slide} ({result.model_kind}) has no {', '.join(missing)}; "
            "sampled tiles and glimpses come from dual-attention results"
        )
    return [np.asarray(result.arrays[n]) for n in names]


def soft_attention_layer_data(
    result: Any, scale: tuple[float, float], units: tuple[str, str] = ("µm", "µm")
) -> tuple[np.ndarray, dict, str]:
    """The soft attention of a dual-attention result as an image over the slide.

    The map is shown at its own resolution (one pixel per attention cell, ``scale`` =
    cell size) min-max normalised over the tissue as the sampling sees it (the paper's
    Â: 1 at the most attended cell, 0 outside the tissue); the raw probabilities are
    in ``metadata["attention"]``.
    """
    from ..models.sampling import minmax_normalise

    (attention,) = _dual_arrays(result, "soft_attention")
    tissue = np.asarray(result.arrays.get("soft_tissue", attention > 0), dtype=bool)
    geometry = result.info.get("soft_attention", {})
    cell = float(geometry.get("cell_size", 1.0))
    ox, oy = (float(v) for v in geometry.get("origin", (0, 0)))
    shown = minmax_normalise(attention, tissue) if tissue.any() else np.zeros_like(attention)
    sy, sx = scale
    kwargs = {
        "name": f"soft attention ({result.predicted_class})",
        "scale": (cell * sy, cell * sx),
        "translate": ((oy + cell / 2 - 0.5) * sy, (ox + cell / 2 - 0.5) * sx),
        "units": units,
        "axis_labels": ("y", "x"),
        "colormap": "magma",
        "opacity": 0.5,
        "blending": "additive",
        "contrast_limits": (0.0, 1.0),
        "metadata": {
            "attention": attention,
            "cell_size": cell,
            "origin": (ox, oy),
            "sampler": result.info.get("sampler"),
        },
    }
    return shown.astype(np.float32), kwargs, "image"


def sampled_tiles_layer_data(
    result: Any, scale: tuple[float, float], units: tuple[str, str] = ("µm", "µm")
) -> tuple[list[np.ndarray], dict, str]:
    """The tiles a dual-attention result sampled, as rectangles coloured by tile class.

    Each rectangle carries its rank in the sampling (1 = most attended), attention value,
    class and that class's probability as features, and shows "rank. class p" as text.
    """
    boxes, attention, rank, classes, probabilities = _dual_arrays(
        result, "tile_boxes", "tile_attention", "tile_rank", "tile_classes", "tile_probabilities"
    )
    names = np.array(result.classes, dtype=object)[classes] if len(classes) else []
    features = {
        "rank": np.asarray(rank, dtype=np.int64) + 1,
        "attention": np.asarray(attention, dtype=np.float64),
        "class": np.asarray(names, dtype=object),
        "probability": probabilities[np.arange(len(classes)), classes].astype(np.float64)
        if len(classes)
        else np.zeros(0),
    }
    width = max(float(np.median(boxes[:, 2])) if len(boxes) else 0.0, 1.0)
    kwargs = {
        "name": f"sampled tiles ({result.info.get('sampler', 'attention')})",
        "shape_type": "rectangle",
        "edge_color": _class_colours(classes),
        "face_color": "transparent",
        "edge_width": width / 40 * scale[1],
        "units": units,
        "features": features,
        "text": {
            "string": "{rank}. {class} {probability:.0%}",
            "size": 10,
            "color": "white",
            "anchor": "upper_left",
        },
        "metadata": {"classes": list(result.classes)},
    }
    return boxes_to_rectangles(boxes, scale), kwargs, "shapes"


def glimpse_layer_data(
    result: Any, scale: tuple[float, float], units: tuple[str, str] = ("µm", "µm")
) -> list[tuple[Any, dict, str]]:
    """The hard attention's glimpses of a dual-attention result as three layers.

    - "glimpse paths" (shapes): one path per tile through its T glimpse centres;
    - "glimpses" (points): the centres, numbered 1..T, with the class the model
      predicted after that glimpse and its probability as features;
    - "glimpse fields" (shapes): each glimpse's box at every magnification (feature
      ``scale``: 1 = the finest).
    """
    centres, boxes, step_probabilities, tile_rank = _dual_arrays(
        result, "glimpse_centres", "glimpse_boxes", "glimpse_probabilities", "tile_rank"
    )
    sy, sx = scale
    n, t = centres.shape[:2]
    # level-0 (x, y) -> world (y, x), pixel centres
    world = np.stack([(centres[..., 1]) * sy, (centres[..., 0]) * sx], -1)  # (N, T, 2)
    ranks = np.asarray(tile_rank, dtype=np.int64) + 1
    paths = [world[i] for i in range(n)] if t > 1 else []
    path_kwargs = {
        "name": "glimpse paths",
        "shape_type": "path",
        "edge_color": "white",
        "edge_width": float(np.median(boxes[..., 0, 2])) / 12 * sx if n else 1.0,
        "units": units,
        "features": {"tile": ranks[: len(paths)]},
    }
    step_classes = step_probabilities.argmax(-1)  # (N, T)
    step_names = np.array(result.classes, dtype=object)[step_classes.ravel()]
    point_kwargs = {
        "name": "glimpses",
        "size": float(np.median(boxes[..., 0, 2])) * sx if n else 1.0,
        "face_color": "transparent",
        "border_color": _class_colours(step_classes.ravel()),
        "border_width": 0.04,  # of the size: a thin ring around the finest field
        "units": units,
        "features": {
            "tile": np.repeat(ranks, t),
            "step": np.tile(np.arange(1, t + 1), n),
            "class": step_names,
            "probability": np.take_along_axis(step_probabilities, step_classes[..., None], -1)
            .ravel()
            .astype(np.float64),
        },
        "text": {"string": "{step}", "size": 9, "color": "white"},
    }
    s = boxes.shape[2]
    field_kwargs = {
        "name": "glimpse fields",
        "shape_type": "rectangle",
        "edge_color": "#56b4e9",
        "face_color": "transparent",
        "edge_width": float(np.median(boxes[..., 0, 2])) / 24 * sx if n else 1.0,
        "units": units,
        "features": {
            "tile": np.repeat(ranks, t * s),
            "step": np.tile(np.repeat(np.arange(1, t + 1), s), n),
            "scale": np.tile(
                np.asarray(result.info.get("glimpse_scales", range(1, s + 1)), float), n * t
            ),
        },
        "visible": False,  # many rectangles; the paths and numbered centres say most
    }
    return [
        (paths, path_kwargs, "shapes"),
        (world.reshape(-1, 2), point_kwargs, "points"),
        (boxes_to_rectangles(boxes.reshape(-1, 4), scale), field_kwargs, "shapes"),
    ]


# The roles of the layers a result makes, in the order they are shown.
RESULT_ROLES = (
    "attention",
    "tile probabilities",
    "soft attention",
    "sampled tiles",
    "glimpse paths",
    "glimpses",
    "glimpse fields",
)


def result_layer_data(
    result: Any, scale: tuple[float, float], units: tuple[str, str] = ("µm", "µm")
) -> list[tuple[str, tuple[Any, dict, str]]]:
    """Every overlay of a result as (role, layer data tuple), in ``RESULT_ROLES`` order.

    Grid attention: the attention maps; sliding window: the tile probabilities; dual
    attention: the soft attention (hidden at first), sampled tiles, glimpse paths,
    glimpses and glimpse fields. A result made of pieces so far (``PartialResult``) gives
    what its pieces have.

    Args:
        result: a ``SlideResult`` of any kind (or a ``PartialResult``).
        scale: level-0 (y, x) µm per pixel of the slide layer.
        units: the slide layer's units.
    """
    layers: list[tuple[str, tuple[Any, dict, str]]] = []
    if any(p.maps is not None for p in result.pieces):
        layers.append(("attention", attention_layer_data(result, scale, units)))
    if any("tile_probabilities" in p.arrays for p in result.pieces):
        layers.append(("tile probabilities", tile_probabilities_layer_data(result, scale, units)))
    if "soft_attention" in (getattr(result, "arrays", None) or {}):
        data, kwargs, kind = soft_attention_layer_data(result, scale, units)
        layers.append(("soft attention", (data, {**kwargs, "visible": False}, kind)))
        layers.append(("sampled tiles", sampled_tiles_layer_data(result, scale, units)))
        roles = ("glimpse paths", "glimpses", "glimpse fields")
        layers.extend(zip(roles, glimpse_layer_data(result, scale, units), strict=True))
    return layers


def geometry_to_world(vertices: Any, scale: tuple[float, float]) -> np.ndarray:
    """Level-0 (x, y) vertices of a region -> napari (y, x) world vertices.

    Region geometry is in level-0 pixel edges (a box (x, y, w, h) has corners x and
    x + w), as ``boxes_to_rectangles`` draws boxes: half a pixel before the pixel centres.
    """
    v = np.asarray(vertices, dtype=np.float64).reshape(-1, 2)
    return np.stack([(v[:, 1] - 0.5) * scale[0], (v[:, 0] - 0.5) * scale[1]], axis=1)


def world_to_geometry(world: Any, scale: tuple[float, float]) -> list[tuple[float, float]]:
    """napari (y, x) world vertices of a shape -> level-0 (x, y) region vertices (the
    inverse of ``geometry_to_world``)."""
    w = np.asarray(world, dtype=np.float64).reshape(-1, 2)
    return [(float(x) / scale[1] + 0.5, float(y) / scale[0] + 0.5) for y, x in w]


def regions_layer_data(
    regions: Any,
    classes: Any,
    scale: tuple[float, float],
    units: tuple[str, str] = ("µm", "µm"),
) -> tuple[list[np.ndarray], dict, str]:
    """A label store's regions of one slide as a shapes layer to draw and edit on.

    Each shape carries the region's ``id``, ``label``, ``kind`` and ``author`` as
    features and is edged in its class's colour (``CLASS_COLOURS`` by the class's index
    in ``classes``; grey for a label outside them); new shapes a user draws have id -1
    until they are labelled.
    """
    classes = list(classes)
    index = np.array([classes.index(r.label) if r.label in classes else -1 for r in regions])
    colours = _class_colours(np.where(index >= 0, index, 0))
    colours[index < 0] = [0.6, 0.6, 0.6, 1.0]
    shapes = [geometry_to_world(r.geometry, scale) for r in regions]
    kwargs = {
        "name": "regions",
        "shape_type": [
            "rectangle" if r.kind in ("rectangle", "tile") else "polygon" for r in regions
        ]
        or "rectangle",
        "edge_color": colours if len(regions) else "white",
        "face_color": "transparent",
        "edge_width": 4 * scale[1],
        "units": units,
        "features": {
            "id": np.array([r.id for r in regions], dtype=np.int64),
            "label": np.array([r.label for r in regions], dtype=object),
            "kind": np.array([r.kind for r in regions], dtype=object),
            "author": np.array([r.author for r in regions], dtype=object),
        },
        "feature_defaults": {"id": -1, "label": "", "kind": "", "author": ""},
        "text": {"string": "{label}", "size": 10, "color": "white", "anchor": "upper_left"},
    }
    return shapes, kwargs, "shapes"


def inspect_at(result: Any, x: float, y: float, map_index: int | None = None) -> dict | None:
    """What a result says about level-0 point (x, y): the most specific item there.

    In order: a glimpse (its finest box; of overlapping ones, the one centred nearest the
    point), a sampled tile (dual-attention results), a
    tissue cell of a piece's grid (grid attention, with the attention of ``map_index``,
    an original map number, when given; other kinds with the piece's call). None where
    the result says nothing.

    Returns:
        {"kind", "box" (level-0 x, y, w, h), "title" (one line with the prediction),
        and the facts behind it}.
    """
    arrays = getattr(result, "arrays", {}) or {}
    classes = list(result.classes)
    if "glimpse_boxes" in arrays and "glimpse_probabilities" in arrays:
        boxes = np.asarray(arrays["glimpse_boxes"])[:, :, 0]  # (N, T, 4): the finest
        probs = np.asarray(arrays["glimpse_probabilities"])  # (N, T, K)
        ranks = np.asarray(arrays.get("tile_rank", np.arange(len(boxes))))
        inside = _contains(boxes.reshape(-1, 4), x, y).reshape(boxes.shape[:2])
        if inside.any():
            # overlapping glimpses: the one whose centre is nearest the point
            centres = boxes[..., :2] + boxes[..., 2:] / 2
            distance = np.where(inside, np.hypot(centres[..., 0] - x, centres[..., 1] - y), np.inf)
            n, t = np.unravel_index(int(np.argmin(distance)), inside.shape)
            k = int(probs[n, t].argmax())
            return {
                "kind": "glimpse",
                "box": tuple(int(v) for v in boxes[n, t]),
                "tile": int(ranks[n]) + 1,
                "step": int(t) + 1,
                "class": classes[k],
                "probability": float(probs[n, t, k]),
                "title": f"tile {int(ranks[n]) + 1}, glimpse {t + 1}: after it the model "
                f"said {classes[k]} ({float(probs[n, t, k]):.0%})",
            }
    if "tile_boxes" in arrays and "tile_classes" in arrays:
        boxes = np.asarray(arrays["tile_boxes"]).reshape(-1, 4)
        inside = _contains(boxes, x, y)
        if inside.any():
            i = int(np.flatnonzero(inside)[0])
            k = int(arrays["tile_classes"][i])
            p = float(np.asarray(arrays["tile_probabilities"])[i, k])
            rank = int(np.asarray(arrays.get("tile_rank", np.arange(len(boxes))))[i]) + 1
            attention = float(np.asarray(arrays.get("tile_attention", np.zeros(len(boxes))))[i])
            return {
                "kind": "sampled tile",
                "box": tuple(int(v) for v in boxes[i]),
                "rank": rank,
                "attention": attention,
                "class": classes[k],
                "probability": p,
                "title": f"sampled tile {rank} (attention {attention:.3g}): {classes[k]} ({p:.0%})",
            }
    for piece in result.pieces:
        shape = piece.grid_shape
        if shape is None:
            continue
        col = int(np.floor((x - piece.grid_origin[0]) / piece.tile_size))
        row = int(np.floor((y - piece.grid_origin[1]) / piece.tile_size))
        if not (0 <= row < shape[0] and 0 <= col < shape[1]) or not piece.tissue[row, col]:
            continue
        k = int(np.argmax(piece.probabilities))
        facts = {
            "kind": "grid cell",
            "box": piece.tile_box(row, col),
            "piece": int(piece.index),
            "class": classes[k],
            "probability": float(piece.probabilities[k]),
        }
        title = f"piece {piece.index} ({classes[k]} {float(piece.probabilities[k]):.0%})"
        if map_index is not None and piece.maps is not None:
            value = float(piece.maps[map_index, row, col])
            peak = float(piece.maps[map_index].max()) or 1.0
            facts.update(map=int(map_index), attention=value, relative=value / peak)
            title += f", map {map_index}: attention {value:.3g} ({value / peak:.0%} of its peak)"
        facts["title"] = f"tile ({row}, {col}) of {title}"
        return facts
    return None


def _contains(boxes: np.ndarray, x: float, y: float) -> np.ndarray:
    """Which level-0 (x, y, w, h) boxes hold the point."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return (b[:, 0] <= x) & (x < b[:, 0] + b[:, 2]) & (b[:, 1] <= y) & (y < b[:, 1] + b[:, 3])
