"""GUI tests need a real OpenGL context: under Xvfb + Mesa (scripts/test.sh) or a display.

Also the fake results the layer and tour tests draw: ``make_grid_result`` and
``make_dual_result`` build a result of that model kind with the geometry its predict
gives (pieces on the slide's tile lattice; glimpses inside their tiles, one field per
magnification; soft attention with its tissue) from the values a test checks, which the
test passes in.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from napari_slide_attention.results import PieceResult, SlideResult


def pytest_collection_modifyitems(config, items):
    headless = sys.platform.startswith("linux") and not os.environ.get("DISPLAY")
    if not headless:
        return
    skip = pytest.mark.skip(reason="no display: run the suite with scripts/test.sh (Xvfb + Mesa)")
    for item in items:
        if "gui" in item.keywords:
            item.add_marker(skip)


def _slide_call(
    slide: str,
    classes: Sequence[str],
    probabilities: Sequence[float],
    config: dict[str, Any] | None,
) -> dict[str, Any]:
    """The SlideResult fields every kind fills alike: the slide's call (its most probable
    class) and the model's configuration, or none (a run in progress)."""
    return dict(
        slide=slide,
        classes=tuple(classes),
        probabilities=np.asarray(probabilities, np.float32),
        predicted=int(np.argmax(probabilities)),
        timings={},
        model={"config": config} if config is not None else {},
        slide_info={},
    )


def _grid_result(
    *,
    slide: str,
    classes: Sequence[str],
    probabilities: Sequence[float],
    tile_px: int,
    pieces: Sequence[dict[str, Any]],
    config: dict[str, Any] | None = None,
) -> SlideResult:
    """A grid-attention result whose pieces sit on the slide's ``tile_px`` lattice.

    Each piece's box is its grid's extent, every cell of it is tissue, and it makes the
    slide's call; the slide's class is the most probable.

    Args:
        slide: The slide's path as the result names it.
        classes: Class names.
        probabilities: (C,) slide-level class probabilities.
        tile_px: Tile edge in level-0 px.
        pieces: One dict per piece: ``index``, ``origin`` (level-0 (x, y) of its first
            tile), ``maps`` (m, H', W') and ``contributions`` (C, m), each map's weight in
            each class.
        config: The model's configuration, or None for a result without one.
    """
    made = []
    for piece in pieces:
        maps = np.asarray(piece["maps"], np.float32)  # (m, H', W')
        rows, cols = maps.shape[1:]
        x, y = piece["origin"]
        made.append(
            PieceResult(
                index=piece["index"],
                box=(x, y, cols * tile_px, rows * tile_px),
                probabilities=np.asarray(probabilities, np.float32),
                grid_origin=(x, y),
                tile_size=tile_px,
                maps=maps,
                tissue=np.ones((rows, cols), bool),
                arrays={"map_contributions": np.asarray(piece["contributions"], np.float32)},
            )
        )
    return SlideResult(
        model_kind="grid-attention",
        aggregation="highest-risk",
        pieces=made,
        **_slide_call(slide, classes, probabilities, config),
    )


def _dual_result(
    *,
    slide: str,
    classes: Sequence[str],
    probabilities: Sequence[float],
    soft_attention: np.ndarray,
    soft_cell_px: float,
    tile_boxes: Sequence[Sequence[int]],
    tile_attention: Sequence[float],
    tile_probabilities: Sequence[Sequence[float]],
    glimpses: int,
    glimpse_start: tuple[float, float],
    glimpse_step: tuple[float, float],
    glimpse_sides: Sequence[float],
    config: dict[str, Any] | None = None,
) -> SlideResult:
    """A dual-attention result: sampled tiles, each with a straight path of glimpses.

    The tissue is where the soft attention is above 0. Tiles are ranked by attention,
    highest first; a tile's class is its most probable; each glimpse's probabilities are
    the tile's (change ``arrays["glimpse_probabilities"]`` afterwards for a tile that
    changes its mind). The slide's class is the most probable.

    Args:
        slide: The slide's path as the result names it.
        classes: Class names.
        probabilities: (C,) slide-level class probabilities.
        soft_attention: (h, w) soft attention over cells of ``soft_cell_px`` level-0 px
            from the slide's origin; 0 off the tissue.
        soft_cell_px: Soft attention cell edge in level-0 px.
        tile_boxes: (N, 4) level-0 (x, y, w, h) of the sampled tiles.
        tile_attention: (N,) each tile's soft attention.
        tile_probabilities: (N, C) each tile's class probabilities.
        glimpses: Glimpses per tile (T).
        glimpse_start: Level-0 (x, y) of a tile's first glimpse centre from its top-left.
        glimpse_step: Level-0 (x, y) from one glimpse centre to the next.
        glimpse_sides: Level-0 edge of each magnification's field, finest first.
    """
    boxes = np.asarray(tile_boxes, np.int64)
    attention = np.asarray(tile_attention, np.float32)
    tile_probabilities = np.asarray(tile_probabilities, np.float32)
    rank = np.empty(len(boxes), np.int64)
    rank[np.argsort(-attention, kind="stable")] = np.arange(len(boxes))
    steps = np.arange(glimpses)[:, None]  # (T, 1)
    centres = (
        boxes[:, None, :2] + np.asarray(glimpse_start) + steps * np.asarray(glimpse_step)
    ).astype(np.float32)  # (N, T, 2) level-0 (x, y)
    side = np.broadcast_to(np.asarray(glimpse_sides, np.float64), (*centres.shape[:2], 2))
    glimpse_boxes = np.stack(
        [centres[..., :1] - side / 2, centres[..., 1:] - side / 2, side, side], -1
    ).astype(np.float32)  # (N, T, S, 4)
    soft = np.asarray(soft_attention, np.float32)
    return SlideResult(
        model_kind="dual-attention",
        aggregation="most-frequent-tile-class",
        pieces=[],
        **_slide_call(slide, classes, probabilities, config),
        arrays={
            "soft_attention": soft,
            "soft_tissue": soft > 0,
            "tile_boxes": boxes,
            "tile_attention": attention,
            "tile_rank": rank,
            "tile_classes": tile_probabilities.argmax(1).astype(np.int64),
            "tile_probabilities": tile_probabilities,
            "glimpse_centres": centres,
            "glimpse_boxes": glimpse_boxes,
            "glimpse_probabilities": np.repeat(tile_probabilities[:, None], glimpses, 1),
        },
        info={
            "sampler": "attention",
            "soft_attention": {"origin": [0, 0], "cell_size": float(soft_cell_px)},
            "glimpse_scales": [float(s / glimpse_sides[0]) for s in glimpse_sides],
        },
    )


@pytest.fixture
def make_grid_result() -> Callable[..., SlideResult]:
    """Builds a grid-attention result from its pieces' maps (see ``_grid_result``)."""
    return _grid_result


@pytest.fixture
def make_dual_result() -> Callable[..., SlideResult]:
    """Builds a dual-attention result from its sampled tiles (see ``_dual_result``)."""
    return _dual_result
