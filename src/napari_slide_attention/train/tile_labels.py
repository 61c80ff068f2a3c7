"""Tile labels from region labels, for the dual model's hard attention (our extension for
sparse lesions, PAPERS.md §2; ``train dual --tile-labels regions``).

The paper labels every sampled tile with its slide's class. Here a tile takes the class of
the regions it overlaps, the lowest-risk class when it overlaps none
(``region_tile_labels``). A training slide's regions are its lesion boxes in the cohort,
which ``train --labels`` replaces with a label store's regions (``train/labels.py``), so an
annotator's corrections reach the glimpse model. ``check_regions`` refuses a slide that
would need regions and has none.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..slide.boxes import Box, overlapping

__all__ = ["TILE_LABELS", "check_regions", "region_tile_labels"]

TILE_LABELS = ("slide", "regions")


def region_tile_labels(
    tile_boxes: np.ndarray, regions: Sequence[tuple[Box, int]], risk: Sequence[int]
) -> np.ndarray:
    """(N,) int64 class of each tile from region labels: the highest-risk class of the
    regions the tile overlaps (shares area with; touching an edge is not overlapping), the
    lowest-risk class when it overlaps none.

    Args:
        tile_boxes: (N, 4) level-0 (x, y, w, h) tiles.
        regions: (level-0 box, class index) of the slide's regions.
        risk: class indices from lowest to highest risk.
    """
    boxes = np.asarray(tile_boxes, dtype=np.int64).reshape(-1, 4)
    rank = {int(c): i for i, c in enumerate(risk)}
    labels = np.full(len(boxes), int(risk[0]), dtype=np.int64)
    for box, cls in sorted(regions, key=lambda region: rank[int(region[1])]):
        # in rising risk, so a tile on several regions keeps the highest-risk class
        labels[overlapping(boxes, [box])] = int(cls)
    return labels


def check_regions(
    slides: Sequence[tuple[str, int, Sequence[tuple[Box, int]] | None]],
    classes: Sequence[str],
    lowest: int,
) -> None:
    """Every training slide has a region source for tile labels from regions; a slide of
    the lowest-risk class needs none (none of its tiles shows a lesion).

    Args:
        slides: (path, class index, regions or None when none are known) per slide.
        classes: the class names.
        lowest: the lowest-risk class index.

    Raises:
        ValueError: one line naming the first slide without regions.
    """
    for slide, label, regions in slides:
        if regions is None and label != lowest:
            raise ValueError(
                f"{slide}: no regions to label its tiles from (tile labels from regions; the "
                f"slide is {classes[label]!r}): give its lesion boxes in the cohort's lesions "
                "column (JSON boxes or 'sidecar') or regions in a label store (--labels)"
            )
