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
