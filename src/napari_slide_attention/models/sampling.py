"""Choosing tiles from an attention map, and learning the attention through them.

Two kinds of sampling live here.

**The paper's custom sampling** (Raza et al., Sec. III-B), used to pick the high-power
tiles of a slide, in numpy and scikit-learn:

1. ``minmax_normalise``: Â, the attention A min-max normalised to (0, 1] over tissue.
2. ``refine_mask``: the mask m of cells to sample from: adaptive thresholding of Â for
   HER2 "positive" maps (``"threshold"``), k-means with 3 clusters for MMR "tumour"
   maps (``"kmeans"``), or the tissue itself (``"none"``).
3. ``sample_tiles``: F = m·n + m·Â with noise n ~ U[low, high] inside m only; the cells
   ranked by F; a greedy walk down the ranking that keeps a cell only when it lies
   farther than d_t (in cells) from every kept one, until N; each kept cell mapped to
   a level-0 box. ``random_tiles`` is the random-sampling baseline (Gumbel-max over
   the tissue).

**Attention sampling** (Katharopoulos & Fleuret 2019), used to train the attention,
in torch: ``sample_without_replacement`` draws N positions from A one after the other
without replacement (Gumbel-top-k), and ``expected_without_replacement`` turns the
features at those positions into an estimate of Σ_i a_i f_i whose value and
gradients (w.r.t. the attention and the features) are unbiased.

The unbiasedness holds only for positions drawn by ``sample_without_replacement``
from the same attention. The paper's custom sampling (mask, added noise, top-k,
distance rule) draws from a different distribution, so feeding its tiles to the
estimator gives a biased gradient; train through ``sample_without_replacement`` and
use ``sample_tiles`` to choose the tiles a slide is scored on.

Coordinates: grid cells are (row, col); level-0 points, origins and sizes are (x, y)
and (w, h); boxes are (x, y, w, h) in level-0 pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

__all__ = [
    "RefinedMask",
    "SampledTiles",
    "cells_to_boxes",
    "expected_without_replacement",
    "minmax_normalise",
    "otsu_threshold",
    "random_tiles",
    "refine_mask",
    "sample_tiles",
    "sample_without_replacement",
]

RefineMethod = Literal["threshold", "kmeans", "none"]

# Â of the least-attended tissue cell: min-max normalisation gives 0 there, but the
# paper's range is (0, 1], so tissue stays distinguishable from non-tissue (0).
NORMALISED_FLOOR = 1e-6


# -- the paper's custom sampling (numpy) ---------------------------------------------------
def _check_grid(attention: np.ndarray, tissue: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    attention = np.asarray(attention, dtype=np.float64)
    tissue = np.asarray(tissue, dtype=bool)
    if attention.ndim != 2 or attention.shape != tissue.shape:
        raise ValueError(
            f"attention and tissue must be 2-D maps of one shape, got "
            f"{attention.shape} and {tissue.shape}"
        )
    if not tissue.any():
        raise ValueError("the tissue mask is empty: there is nothing to sample from")
    if not np.isfinite(attention[tissue]).all():
        raise ValueError("attention has non-finite values on tissue")
    return attention, tissue


def minmax_normalise(attention: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """Â: the attention min-max normalised to (0, 1] over the tissue, 0 elsewhere.

    The least-attended tissue cell gets ``NORMALISED_FLOOR`` (1e-6) rather than 0, the
    most-attended one 1, so every tissue cell is positive as in the paper's (0, 1].
    A map that is constant over the tissue (no preference, e.g. an untrained model)
    gives 1 on every tissue cell.

    Args:
        attention: (h', w') attention A of one slide.
        tissue: (h', w') bool tissue cells.
    """
    attention, tissue = _check_grid(attention, tissue)
    values = attention[tissue]
    low, high = float(values.min()), float(values.max())
    normalised = np.zeros_like(attention)
    if high - low <= 1e-9 * max(abs(high), abs(low)):
        normalised[tissue] = 1.0
    else:
        scaled = (values - low) / (high - low)  # [0, 1]
        normalised[tissue] = NORMALISED_FLOOR + (1.0 - NORMALISED_FLOOR) * scaled
    return normalised


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of 1-D values, exact: the midpoint of the gap between sorted
    values that maximises the between-class variance (values above it are foreground).

    Histogram versions (e.g. skimage's, 256 bins) return a bin centre and so can split
    the values of one bin; here every gap between distinct values is a candidate. A
    constant input returns its value (nothing lies above it).

    Args:
        values: the values, any shape.
    """
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if v.size == 0:
        raise ValueError("Otsu's threshold needs at least one value")
    gaps = np.flatnonzero(v[1:] > v[:-1])  # split after v[i] for each i in gaps
    if gaps.size == 0:
        return float(v[0])
    count = np.arange(1, v.size + 1, dtype=np.float64)
    total = np.cumsum(v)
    w0 = count[gaps] / v.size
    mu0 = total[gaps] / count[gaps]
    mu1 = (total[-1] - total[gaps]) / (v.size - count[gaps])
    between = w0 * (1 - w0) * (mu0 - mu1) ** 2
    best = gaps[int(np.argmax(between))]
    return float((v[best] + v[best + 1]) / 2)


@dataclass(frozen=True)
class RefinedMask:
    """The mask m of cells the tiles are sampled from.

    Attributes:
        mask: (h', w') bool, always inside the tissue.
        method: "threshold", "kmeans" or "none".
        threshold: the cut on Â (cells with Â > threshold are in the mask): Otsu's
            threshold, or the midpoint between the two highest k-means centres; None
            for "none" and when the mask fell back to the tissue.
        fell_back: True when refining left no cell and the mask is the tissue instead.
    """

    mask: np.ndarray
    method: str
    threshold: float | None
    fell_back: bool


def refine_mask(
    normalised: np.ndarray, tissue: np.ndarray, method: RefineMethod = "threshold", *, seed: int = 0
) -> RefinedMask:
    """The mask m of high-attention cells to sample from (paper, Sec. III-B 1 and 2).

    - ``"threshold"``: the paper's "adaptive thresholding" of HER2 "positive" maps. Our
      reading: Otsu's threshold (``otsu_threshold``) over the Â values of the tissue
      cells (not the background, which would dominate); m = tissue cells above it.
    - ``"kmeans"``: the paper's MMR "tumour" maps: k-means with 3 clusters over the
      values of the whole map (background, normal tissue, tumour; non-tissue cells
      enter as 0, the paper's background cluster); m = the cluster with the highest
      centre. With fewer than 3 distinct values each value is its own cluster.
    - ``"none"``: m = the tissue.

    m is always intersected with the tissue; when refining leaves no cell (e.g. a
    constant map has nothing above Otsu's threshold), m falls back to the tissue and
    ``fell_back`` says so.

    Args:
        normalised: (h', w') Â from ``minmax_normalise`` (0 off tissue).
        tissue: (h', w') bool tissue cells.
        method: "threshold", "kmeans" or "none".
        seed: random state of k-means (for determinism).
    """
    normalised, tissue = _check_grid(normalised, tissue)
    threshold: float | None = None
    if method == "none":
        mask = tissue.copy()
    elif method == "threshold":
        threshold = otsu_threshold(normalised[tissue])
        mask = tissue & (normalised > threshold)
    elif method == "kmeans":
        values = np.where(tissue, normalised, 0.0)
        distinct = np.unique(values)
        if distinct.size < 3:
            centres = distinct
        else:
            from sklearn.cluster import KMeans

            kmeans = KMeans(n_clusters=3, n_init=3, random_state=seed)
            kmeans.fit(values.reshape(-1, 1))
            centres = np.sort(kmeans.cluster_centers_.ravel())
        # In 1-D, the cells nearest the highest centre are those above the midpoint.
        threshold = float((centres[-1] + centres[-2]) / 2) if centres.size > 1 else None
        mask = tissue & (values > threshold) if threshold is not None else tissue.copy()
    else:
        raise ValueError(f"method must be 'threshold', 'kmeans' or 'none', got {method!r}")
    if not mask.any():
        return RefinedMask(mask=tissue.copy(), method=method, threshold=None, fell_back=True)
    return RefinedMask(mask=mask, method=method, threshold=threshold, fell_back=False)


@dataclass(frozen=True)
class SampledTiles:
    """Tiles chosen on one slide's attention grid, in the order they were chosen.

    Attributes:
        cells: (N, 2) int64 grid cells (row, col).
        boxes: (N, 4) int64 level-0 boxes (x, y, w, h).
        attention: (N,) the attention probability A at each cell.
        normalised: (N,) Â at each cell.
        score: (N,) F at each cell of m, Â at a cell of the rest of the tissue (the
            ranking score; the Gumbel key for random tiles).
        rank: (N,) int64, order of choice (0 = chosen first).
        from_mask: (N,) bool, False for cells taken from the tissue outside the refined
            mask after the mask ran out.
        mask: (h', w') bool, the mask m the ranking started from.
        requested: N asked for; ``len(self)`` may be smaller (see ``note``).
        depth: how many ranked cells the walk examined.
        note: empty when N tiles came from the mask; otherwise what happened.
    """

    cells: np.ndarray
    boxes: np.ndarray
    attention: np.ndarray
    normalised: np.ndarray
    score: np.ndarray
    rank: np.ndarray
    from_mask: np.ndarray
    mask: np.ndarray
    requested: int
    depth: int
    note: str = field(default="")

    def __len__(self) -> int:
        return len(self.cells)


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _pair(value: float | tuple[float, float], name: str) -> tuple[float, float]:
    x, y = (value, value) if np.isscalar(value) else value
    if not (x > 0 and y > 0 and math.isfinite(x) and math.isfinite(y)):
        raise ValueError(f"{name} must be positive, got {value}")
    return float(x), float(y)


def cells_to_boxes(
    cells: np.ndarray,
    *,
    cell_size: float | tuple[float, float],
    tile_size: int | tuple[int, int],
    origin: tuple[float, float] = (0, 0),
    slide_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Level-0 boxes (x, y, w, h) of tiles centred on grid cells: (N, 4) int64.

    A cell (r, c) has its centre at origin + ((c + ½)·s_x, (r + ½)·s_y) in level-0
    pixels; the tile is a ``tile_size`` box around it, rounded to whole pixels, then
    shifted (never cropped) to lie inside the slide when ``slide_size`` is given. A
    tile larger than the slide starts at 0 and overhangs the far edge.

    Args:
        cells: (N, 2) grid cells (row, col).
        cell_size: level-0 pixels per attention cell, one value or (x, y); the
            downsample of the low-resolution view times the model's pool (32 × 8).
        tile_size: tile edge in level-0 pixels, one value or (w, h).
        origin: level-0 (x, y) of the grid's top-left corner.
        slide_size: level-0 (w, h) of the slide, or None for no shifting.
    """
    sx, sy = _pair(cell_size, "cell_size")
    tw, th = (tile_size, tile_size) if np.isscalar(tile_size) else tile_size
    tw, th = int(tw), int(th)
    if tw < 1 or th < 1:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    cells = np.asarray(cells, dtype=np.int64).reshape(-1, 2)
    cx = origin[0] + (cells[:, 1] + 0.5) * sx
    cy = origin[1] + (cells[:, 0] + 0.5) * sy
    x = np.floor(cx - tw / 2 + 0.5).astype(np.int64)
    y = np.floor(cy - th / 2 + 0.5).astype(np.int64)
    if slide_size is not None:
        width, height = (int(v) for v in slide_size)
        x = np.maximum(np.minimum(x, width - tw), 0)
        y = np.maximum(np.minimum(y, height - th), 0)
    sizes = np.broadcast_to(np.array([tw, th], dtype=np.int64), (len(cells), 2))
    return np.column_stack([x, y, sizes]).astype(np.int64)


def _walk(order: np.ndarray, shape: tuple[int, int], n: int, distance: float):
    """Greedy walk down ``order`` (flat cells, best first): keep a cell when it lies
    farther than ``distance`` from every kept one. Returns positions in ``order`` of the
    kept cells and how many ranked cells were examined."""
    rows, cols = np.divmod(order, shape[1])
    allowed = np.ones(len(order), dtype=bool)
    kept: list[int] = []
    depth = 0
    while len(kept) < n:
        free = np.flatnonzero(allowed[depth:])
        if free.size == 0:
            depth = len(order)
            break
        k = depth + int(free[0])
        kept.append(k)
        depth = k + 1
        # Squared distances, so "farther than d" needs no square root.
        near = (rows - rows[k]) ** 2 + (cols - cols[k]) ** 2 <= distance**2
        allowed &= ~near
    return np.asarray(kept, dtype=np.int64), depth


def _tiles(
    flat: np.ndarray,
    depth: int,
    *,
    attention: np.ndarray,
    normalised: np.ndarray,
    score: np.ndarray,
    mask: np.ndarray,
    requested: int,
    note: str,
    cell_size: float | tuple[float, float],
    tile_size: int | tuple[int, int],
    origin: tuple[float, float],
    slide_size: tuple[int, int] | None,
) -> SampledTiles:
    """The ``SampledTiles`` of the flat cells ``flat`` (in order of choice)."""
    rows, cols = np.divmod(flat, attention.shape[1])
    cells = np.column_stack([rows, cols]).astype(np.int64).reshape(-1, 2)
    return SampledTiles(
        cells=cells,
        boxes=cells_to_boxes(
            cells, cell_size=cell_size, tile_size=tile_size, origin=origin, slide_size=slide_size
        ),
        attention=attention.ravel()[flat],
        normalised=normalised.ravel()[flat],
        score=score.ravel()[flat],
        rank=np.arange(len(flat), dtype=np.int64),
        from_mask=mask.ravel()[flat],
        mask=mask,
        requested=requested,
        depth=depth,
        note=note,
    )


def sample_tiles(
    attention: np.ndarray,
    tissue: np.ndarray,
    n: int,
    *,
    cell_size: float | tuple[float, float],
    refine: RefineMethod = "threshold",
    noise: tuple[float, float] = (0.0, 1.0),
    distance: float | None = None,
    rng: np.random.Generator | int | None = None,
    tile_size: int | tuple[int, int] = 2048,
    origin: tuple[float, float] = (0, 0),
    slide_size: tuple[int, int] | None = None,
    candidates: int | None = None,
    fill_from_tissue: bool = True,
) -> SampledTiles:
    """N spatially distinct high-attention tiles of one slide (the paper's sampling).

    1. Â = ``minmax_normalise(A)``; m = ``refine_mask(Â, method=refine)``.
    2. F = m·n + m·Â, with n ~ U[low, high] drawn for every cell and kept inside m only
       (HER2: [0, 1]; MMR: [-2, 1]).
    3. The cells of m ranked by F, best first. Only cells of m are candidates: the
       paper's F is 0 outside m, which with negative noise would rank background above
       tissue, against its stated aim that no tile holds background.
    4. A greedy walk down the ranking keeps a cell only if its Euclidean distance (in
       cells) to every kept cell is greater than d_t, until N are kept. The paper walks
       a pool of the top 2N cells (``candidates``); when the pool gives N tiles the
       result is the same, and when it does not we continue down the ranking (the
       paper is silent) and ``note`` says so.
    5. If m runs out (``fill_from_tissue``), the walk continues over the rest of the
       tissue ranked by Â, highest first (``from_mask`` is False for these): the paper
       keeps its noise inside m ("to focus the noise only on the relevant areas"), so
       outside m the attention alone orders the cells (the noise only breaks exact
       ties); if the tissue runs out too, fewer than N tiles come back and ``note`` says
       so.
    6. Each cell becomes a ``tile_size`` level-0 box centred on it (``cells_to_boxes``).

    Args:
        attention: (h', w') attention A of one slide (numpy, or a detached CPU tensor).
        tissue: (h', w') bool tissue cells.
        n: N, the number of tiles (10 for HER2, 15 for MMR).
        cell_size: level-0 pixels per attention cell (the paper's s = 32 times the
            model's pool), one value or (x, y).
        refine: how m is made: "threshold" (HER2), "kmeans" (MMR) or "none".
        noise: (low, high) of the uniform noise, low <= high.
        distance: d_t in cells; None = the tile edge in cells (tile_size / cell_size),
            so tiles side by side do not overlap. 0 keeps any distinct cells.
        rng: numpy Generator or seed; the same seed gives the same tiles.
        tile_size: tile edge in level-0 pixels (2048 in the paper), one value or (w, h).
        origin: level-0 (x, y) of the grid's top-left corner.
        slide_size: level-0 (w, h) of the slide; tiles are shifted to lie inside it.
        candidates: size of the paper's pool of top cells (None = 2N: 20 for HER2, 30
            for MMR); it changes no tile, only whether ``note`` reports a walk past it.
        fill_from_tissue: continue over the tissue outside m when m gives fewer than N.
    """
    attention, tissue = _check_grid(attention, tissue)
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    n = int(n)
    pool = 2 * n if candidates is None else int(candidates)
    if pool < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    low, high = (float(v) for v in noise)
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(f"noise must be finite (low, high) with low <= high, got {noise}")
    if distance is None:
        sx, sy = _pair(cell_size, "cell_size")
        tw, th = (tile_size, tile_size) if np.isscalar(tile_size) else tile_size
        distance = min(tw / sx, th / sy)
    if not (math.isfinite(distance) and distance >= 0):
        raise ValueError(f"distance must be finite and >= 0, got {distance}")

    normalised = minmax_normalise(attention, tissue)
    refined = refine_mask(normalised, tissue, refine)
    mask = refined.mask
    draw = _rng(rng).uniform(low, high, size=attention.shape)  # every cell: seed-stable
    score = mask * draw + mask * normalised  # F

    # Ranking: cells of m by F, then (optionally) the rest of the tissue by Â, the
    # noise breaking its ties only.
    flat_mask = np.flatnonzero(mask)
    order = flat_mask[np.argsort(-score.ravel()[flat_mask], kind="stable")]
    n_mask = len(order)
    if fill_from_tissue:
        rest = np.flatnonzero(tissue & ~mask)
        by_attention = np.lexsort((-draw.ravel()[rest], -normalised.ravel()[rest]))
        order = np.concatenate([order, rest[by_attention]])
        score = np.where(mask, score, np.where(tissue, normalised, 0.0))

    kept, depth = _walk(order, attention.shape, n, distance)
    flat = order[kept]

    notes = []
    if refined.fell_back:
        notes.append(f"refining ({refine}) left no cell; sampled from the whole tissue")
    if depth > pool and len(flat):
        notes.append(f"the top {pool} cells gave fewer than {n} distinct tiles; walked {depth}")
    from_rest = int((kept >= n_mask).sum())
    if from_rest:
        notes.append(f"the mask gave {len(flat) - from_rest} tiles; {from_rest} from other tissue")
    if len(flat) < n:
        notes.append(f"only {len(flat)} of {n} tiles fit at distance > {distance:g} cells")
    return _tiles(
        flat,
        depth,
        attention=attention,
        normalised=normalised,
        score=score,
        mask=mask,
        requested=n,
        note="; ".join(notes),
        cell_size=cell_size,
        tile_size=tile_size,
        origin=origin,
        slide_size=slide_size,
    )


def random_tiles(
    tissue: np.ndarray,
    n: int,
    *,
    cell_size: float | tuple[float, float],
    rng: np.random.Generator | int | None = None,
    distance: float = 0.0,
    tile_size: int | tuple[int, int] = 2048,
    origin: tuple[float, float] = (0, 0),
    slide_size: tuple[int, int] | None = None,
) -> SampledTiles:
    """N tiles drawn uniformly inside the tissue without replacement (the paper's
    random-sampling baseline, Sec. IV-B 3a).

    Gumbel-max trick: the tissue cells ranked by Gumbel noise; the first N (or, with
    ``distance`` > 0, the same greedy distance walk as ``sample_tiles``) are the tiles.
    ``attention`` is the uniform 1 / #tissue, ``normalised`` 1 and ``score`` the Gumbel
    key of each cell.

    Args:
        tissue: (h', w') bool tissue cells.
        n: number of tiles.
        cell_size: level-0 pixels per attention cell, one value or (x, y).
        rng: numpy Generator or seed.
        distance: d_t in cells (0: any distinct cells).
        tile_size: tile edge in level-0 pixels, one value or (w, h).
        origin: level-0 (x, y) of the grid's top-left corner.
        slide_size: level-0 (w, h) of the slide; tiles are shifted to lie inside it.
    """
    tissue = np.asarray(tissue, dtype=bool)
    uniform = tissue / max(int(tissue.sum()), 1)
    _, tissue = _check_grid(uniform, tissue)
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    n = int(n)
    if not (math.isfinite(distance) and distance >= 0):
        raise ValueError(f"distance must be finite and >= 0, got {distance}")
    keys = np.where(tissue, _rng(rng).gumbel(size=tissue.shape), -np.inf)
    cells = np.flatnonzero(tissue)
    order = cells[np.argsort(-keys.ravel()[cells], kind="stable")]
    kept, depth = _walk(order, tissue.shape, n, distance)
    flat = order[kept]
    note = "" if len(flat) == n else f"only {len(flat)} of {n} tiles fit in the tissue"
    return _tiles(
        flat,
        depth,
        attention=uniform,
        normalised=tissue.astype(np.float64),
        score=keys,
        mask=tissue,
        requested=n,
        note=note,
        cell_size=cell_size,
        tile_size=tile_size,
        origin=origin,
        slide_size=slide_size,
    )


# -- attention sampling (torch) ------------------------------------------------------------
def sample_without_replacement(
    attention: torch.Tensor, n: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """N positions per row drawn without replacement from the attention: (B, N) int64,
    in sampling order.

    Gumbel-top-k on log A: the N largest of log a_i + G_i (G_i i.i.d. Gumbel) in
    descending order are distributed as N sequential draws without replacement, each
    from A renormalised over the positions not yet drawn (Kool et al. 2019). That
    is the sampling ``expected_without_replacement`` assumes. No gradient flows.

    Args:
        attention: (B, P) probabilities (each row sums to 1; zeros are never drawn).
        n: number of positions per row.
        generator: torch generator on the attention's device, for reproducibility.

    Raises:
        ValueError: when a row has fewer than ``n`` positions with positive attention.
    """
    if attention.ndim != 2:
        raise ValueError(f"attention must be (B, P), got shape {tuple(attention.shape)}")
    with torch.no_grad():
        attention = attention.detach()
        support = int((attention > 0).sum(1).min())
        if n < 1 or n > support:
            raise ValueError(
                f"cannot draw {n} distinct positions: a row has {support} with attention > 0"
            )
        tiny = torch.finfo(attention.dtype).tiny
        exponential = torch.empty_like(attention).exponential_(generator=generator)
        keys = torch.log(attention) - torch.log(exponential.clamp_min(tiny))  # log a + Gumbel
        return torch.topk(keys, n, dim=1, sorted=True).indices  # (B, N)


def expected_without_replacement(
    attention: torch.Tensor, indices: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """Unbiased estimate of Σ_i a_i f_i from N positions drawn without replacement:
    (B, *D).

    With i_1 … i_N drawn one after the other (``sample_without_replacement``),
    a_k = a_{i_k}, f_k = f_{i_k} and the EXCLUSIVE sums S_k = Σ_{j<k} a_j and
    C_k = Σ_{j<k} a_j f_j, each term T_k = C_k + (1 − S_k)·f_k is unbiased: given the
    first k − 1 draws, i_k has probability q_k = a_k / (1 − S_k), so
    E[(1 − S_k) f_k] = Σ_{i not drawn} a_i f_i, and C_k holds the drawn ones exactly.
    The estimate is the mean of the N terms (Katharopoulos & Fleuret 2019).

    Gradients: in the autograd graph each term is C_k + a_k·f_k / sg(q_k) (sg = stop
    gradient; the value is unchanged since a_k / q_k = 1 − S_k). Given the earlier
    draws, E[∇(a_k f_k) / q_k] = Σ_{i not drawn} ∇(a_i f_i), so every term's expected
    gradient, w.r.t. the attention (hence its logits) and the values alike, is
    ∇ Σ_i a_i f_i. Public PyTorch ports use inclusive cumulative sums; their value is
    the same, but their hand-written gradients are biased.

    Args:
        attention: (B, P) the full attention (rows sum to 1), with its graph.
        indices: (B, N) positions in the order they were drawn.
        values: (B, N, *D) f at those positions, with its graph.
    """
    if attention.ndim != 2 or indices.ndim != 2 or indices.shape[0] != attention.shape[0]:
        raise ValueError(
            f"attention must be (B, P) and indices (B, N), got {tuple(attention.shape)} "
            f"and {tuple(indices.shape)}"
        )
    if tuple(values.shape[:2]) != tuple(indices.shape):
        raise ValueError(
            f"values must be (B, N, ...) = {tuple(indices.shape)} + ..., got {tuple(values.shape)}"
        )
    batch, n = indices.shape
    a = attention.gather(1, indices)  # (B, N)
    fixed = a.detach()
    before = torch.cumsum(fixed, dim=1) - fixed  # (B, N) exclusive S_k
    remaining = (1.0 - before).clamp_min(0.0)  # 1 − S_k (rounding can dip below 0)
    # Per drawn position: N − 1 − k later terms hold a_k f_k exactly (k from 0), and its
    # own term holds a_k f_k · (1 − S_k) / a_k.
    later = torch.arange(n - 1, -1, -1, device=a.device, dtype=a.dtype)  # (N,)
    weights = a * (later + remaining / fixed.clamp_min(torch.finfo(a.dtype).tiny)) / n
    weights = weights.reshape(batch, n, *([1] * (values.ndim - 2)))  # (B, N, 1...)
    return (weights * values).sum(1)  # (B, *D)
