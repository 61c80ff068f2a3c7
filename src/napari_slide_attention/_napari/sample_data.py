"""napari sample-data contributions: a synthetic needle-in-a-haystack H&E slide and a
synthetic HER2 IHC slide."""

from __future__ import annotations

from ..slide.reader import open_slide
from ..slide.synthetic import sample_slide
from .layers import slide_layer_data


def make_sample_slide() -> list[tuple]:
    """Return the layers of the demo slide, written to the cache on first use."""
    path = sample_slide()
    return slide_layer_data(open_slide(path))


def make_her2_sample_slide() -> list[tuple]:
    """Return the layers of the HER2 IHC demo slide (score 3+), written to the cache on
    first use."""
    path = sample_slide(stain="her2")
    return slide_layer_data(open_slide(path))
