"""Where a dual-attention result looked: the measures both dual benchmarks print.

``dual_needle.py`` (lesion boxes) and ``dual_ihc.py`` (tumour masks and artefact boxes)
ask the same questions of a ``SlideResult`` of the dual model (or of the random
sampler): what share of its sampled tiles lands on a target, how often tiles drawn
uniformly in the same tissue would, and how much of the soft attention A lies on the
target's cells. Everything is taken from the result itself (its attention cells, their
tissue, the tiles' level-0 boxes), so the uniform draws use exactly the dual model's
geometry: the same tissue cells, tile size and slide bounds as its sampler.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from napari_slide_attention.models.sampling import random_tiles

__all__ = ["attention_mass", "cell_centres", "uniform_share"]

# A test of level-0 boxes: (n, 4) x, y, w, h -> (n,) bool, True where a box is on the target.
BoxTest = Callable[[np.ndarray], np.ndarray]


def cell_centres(shape: tuple[int, int], cell: float) -> np.ndarray:
    """(h, w, 2) level-0 (x, y) centres of the soft attention's cells."""
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]]
    return np.stack([(xs + 0.5) * cell, (ys + 0.5) * cell], axis=-1)


def uniform_share(result, on_target: BoxTest, draws: int, seed: int) -> float:
    """The share of tiles drawn uniformly in the result's tissue cells that are on target.

    Each draw takes as many tiles as the result sampled, without replacement, from the
    soft attention's tissue cells (``random_tiles``: the paper's random sampler), with the
    result's tile size, inside the slide.

    Args:
        result: a dual ``SlideResult`` (arrays ``soft_tissue`` and ``tile_boxes``).
        on_target: which level-0 boxes count as on the target.
        draws: how many draws to average.
        seed: the draws' random state.
    """
    tissue = np.asarray(result.arrays["soft_tissue"], dtype=bool)
    boxes = np.asarray(result.arrays["tile_boxes"])
    cell = float(result.info["soft_attention"]["cell_size"])
    tile = (int(boxes[0, 2]), int(boxes[0, 3]))
    rng = np.random.default_rng(seed)
    hits = total = 0
    for _ in range(draws):
        picked = random_tiles(
            tissue,
            len(boxes),
            cell_size=cell,
            rng=rng,
            tile_size=tile,
            slide_size=tuple(result.slide_info["dimensions"]),
        )
        hits += int(np.count_nonzero(on_target(picked.boxes)))
        total += len(picked.boxes)
    return hits / max(total, 1)


def attention_mass(result, on_target_cells: np.ndarray) -> tuple[float, float]:
    """The soft attention's mass on target cells, and those cells' share of the tissue.

    Args:
        result: a dual ``SlideResult`` (arrays ``soft_attention``, ``soft_tissue``).
        on_target_cells: bool, the attention grid's shape: the cells on the target.

    Returns:
        (A on target tissue cells / A on tissue cells, target tissue cells / tissue
        cells): the second is what a uniform A would give.
    """
    attention = np.asarray(result.arrays["soft_attention"], dtype=np.float64)
    tissue = np.asarray(result.arrays["soft_tissue"], dtype=bool)
    target = np.asarray(on_target_cells, dtype=bool) & tissue
    total = attention[tissue].sum()
    return (
        float(attention[target].sum() / total) if total > 0 else 0.0,
        float(target.sum() / max(int(tissue.sum()), 1)),
    )
