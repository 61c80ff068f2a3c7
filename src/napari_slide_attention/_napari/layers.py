"""Pure functions from slides (and later model results) to napari layer data tuples.

Tested without a viewer. One place decides coordinates: slide level-0 pixels,
shown in micrometres with the slide's mpp (pixels when the mpp is unknown).
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
    tile = pieces[0].tile_size
    if any(p.tile_size != tile for p in pieces):
        raise ValueError("the pieces' grids have different tile sizes")
    n_maps = pieces[0].maps.shape[0]
    r0 = min(p.grid_origin[1] // tile for p in pieces)
    c0 = min(p.grid_origin[0] // tile for p in pieces)
    r1 = max(p.grid_origin[1] // tile + p.maps.shape[1] for p in pieces)
    c1 = max(p.grid_origin[0] // tile + p.maps.shape[2] for p in pieces)
    data = np.zeros((n_maps, r1 - r0, c1 - c0), dtype=np.float32)  # (m, rows, cols)
    weights = np.zeros(n_maps)
    for p in pieces:
        peak = p.maps.max(axis=(1, 2), keepdims=True)
        maps = np.divide(p.maps, peak, out=np.zeros_like(p.maps), where=peak > 0)
        r, c = p.grid_origin[1] // tile - r0, p.grid_origin[0] // tile - c0
        h, w = p.maps.shape[1:]
        region = data[:, r : r + h, c : c + w]
        np.maximum(region, maps, out=region)  # neighbouring pieces' grids may share cells
        contributions = p.arrays.get("map_contributions")
        if contributions is not None:
            weights += contributions[result.predicted]
    order = np.argsort(-weights, kind="stable")
    sy, sx = scale
    # A cell covers level-0 px [a, a + tile); its centre in napari's pixel-centre world
    # coordinates is (a + tile / 2 - 0.5) * mpp.
    y0 = (r0 * tile + tile / 2 - 0.5) * sy
    x0 = (c0 * tile + tile / 2 - 0.5) * sx
    kwargs = {
        "name": f"attention maps ({result.predicted_class})",
        "scale": (1.0, tile * sy, tile * sx),
        "translate": (0.0, y0, x0),
        "units": ("pixel", *units),
        "axis_labels": ("map", "y", "x"),
        "colormap": "inferno",
        "opacity": 0.55,
        "blending": "additive",  # cells with no attention (0 = black) leave the slide as is
        "contrast_limits": (0.0, 1.0),
        "metadata": {
            "map_order": order.tolist(),
            "map_weights": weights[order].tolist(),
            "classes": list(result.classes),
            "predicted": result.predicted_class,
            "tile_size": int(tile),
            "origin": (int(c0 * tile), int(r0 * tile)),
        },
    }
    return data[order], kwargs, "image"
