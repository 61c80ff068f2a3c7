"""Tile sampling (Raza et al. Sec. III-B) and the attention-sampling estimator
(Katharopoulos & Fleuret 2019), checked against brute-force enumeration."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from napari_slide_attention.models.sampling import (
    NORMALISED_FLOOR,
    cells_to_boxes,
    expected_without_replacement,
    minmax_normalise,
    otsu_threshold,
    random_tiles,
    refine_mask,
    sample_tiles,
    sample_without_replacement,
)


def blob_slide(shape=(20, 24), seed=0):
    """Attention with a bright blob on a rectangle of tissue; background elsewhere."""
    rng = np.random.default_rng(seed)
    tissue = np.zeros(shape, dtype=bool)
    tissue[2:18, 3:21] = True
    logits = rng.normal(0, 0.1, shape)
    logits[5:9, 12:17] += 3.0  # the blob
    attention = np.where(tissue, np.exp(logits), 0.0)
    return attention / attention.sum(), tissue


def three_levels():
    """A map with background (0), normal tissue (low) and tumour (high) cells."""
    tissue = np.zeros((12, 12), dtype=bool)
    tissue[1:11, 1:11] = True
    attention = np.where(tissue, 1.0, 0.0)
    attention[6:10, 6:10] = 5.0
    attention[1:3, 1:11] += np.linspace(0, 0.2, 10)  # a little spread in the normal level
    return attention / attention.sum(), tissue


def pairwise_distances(cells: np.ndarray) -> np.ndarray:
    d = np.sqrt(((cells[:, None, :] - cells[None, :, :]) ** 2).sum(-1))
    return d[np.triu_indices(len(cells), k=1)]


# -- normalisation and masks -------------------------------------------------------------
def test_minmax_normalise_maps_tissue_to_0_1_and_leaves_background_at_0():
    attention, tissue = blob_slide()
    normalised = minmax_normalise(attention, tissue)
    values = normalised[tissue]
    assert values.max() == 1.0 and math.isclose(values.min(), NORMALISED_FLOOR)
    assert np.all(values > 0) and np.all(normalised[~tissue] == 0)
    # Monotone in the attention.
    order = np.argsort(attention[tissue])
    assert np.all(np.diff(values[order]) >= 0)


def test_minmax_normalise_of_a_constant_map_is_one_on_tissue():
    tissue = np.zeros((4, 5), dtype=bool)
    tissue[1:3, 1:4] = True
    attention = tissue / tissue.sum()
    normalised = minmax_normalise(attention, tissue)
    assert np.all(normalised[tissue] == 1.0) and np.all(normalised[~tissue] == 0)


def test_threshold_refinement_picks_the_bright_blob():
    attention, tissue = blob_slide()
    refined = refine_mask(minmax_normalise(attention, tissue), tissue, "threshold")
    blob = np.zeros_like(tissue)
    blob[5:9, 12:17] = True
    assert not refined.fell_back and refined.threshold is not None
    np.testing.assert_array_equal(refined.mask, blob)


def test_otsu_threshold_splits_in_the_widest_between_class_gap():
    assert otsu_threshold(np.array([0.1, 0.1, 0.2, 0.8, 0.9])) == pytest.approx(0.5)
    assert otsu_threshold(np.full(4, 0.3)) == 0.3
    values = np.random.default_rng(0).normal(size=200)
    values[:40] += 8
    t = otsu_threshold(values)
    assert values[40:].max() < t < values[:40].min()


def test_kmeans_refinement_keeps_the_highest_of_three_clusters():
    attention, tissue = three_levels()
    refined = refine_mask(minmax_normalise(attention, tissue), tissue, "kmeans")
    tumour = np.zeros_like(tissue)
    tumour[6:10, 6:10] = True
    assert not refined.fell_back
    np.testing.assert_array_equal(refined.mask, tumour)
    # Same answer every time (seeded).
    again = refine_mask(minmax_normalise(attention, tissue), tissue, "kmeans")
    np.testing.assert_array_equal(again.mask, refined.mask)


def test_refined_masks_stay_inside_tissue_and_fall_back_when_empty():
    attention, tissue = blob_slide()
    normalised = minmax_normalise(attention, tissue)
    for method in ("threshold", "kmeans", "none"):
        mask = refine_mask(normalised, tissue, method).mask
        assert mask.any() and not np.any(mask & ~tissue)
    np.testing.assert_array_equal(refine_mask(normalised, tissue, "none").mask, tissue)
    constant = minmax_normalise(tissue / tissue.sum(), tissue)
    refined = refine_mask(constant, tissue, "threshold")
    assert refined.fell_back and refined.threshold is None
    np.testing.assert_array_equal(refined.mask, tissue)
    with pytest.raises(ValueError, match="method"):
        refine_mask(normalised, tissue, "otsu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        refine_mask(normalised, np.zeros_like(tissue), "none")


# -- the paper's sampling ------------------------------------------------------------------
def test_tiles_are_distinct_inside_tissue_and_in_rank_order():
    attention, tissue = blob_slide()
    tiles = sample_tiles(
        attention, tissue, 6, cell_size=256, tile_size=768, refine="none", rng=3
    )  # d_t = 768 / 256 = 3 cells
    assert len(tiles) == 6 and tiles.requested == 6
    assert np.all(pairwise_distances(tiles.cells) > 3)
    assert tissue[tiles.cells[:, 0], tiles.cells[:, 1]].all()
    np.testing.assert_array_equal(tiles.rank, np.arange(6))
    assert np.all(np.diff(tiles.score) <= 0)  # chosen walking down the ranking of F
    r, c = tiles.cells.T
    np.testing.assert_allclose(tiles.attention, attention[r, c])
    np.testing.assert_allclose(tiles.normalised, minmax_normalise(attention, tissue)[r, c])
    assert tiles.cells.dtype == np.int64 and tiles.boxes.dtype == np.int64


def test_first_tile_is_the_best_f_in_the_mask():
    attention, tissue = blob_slide()
    rng = np.random.default_rng(11)
    tiles = sample_tiles(attention, tissue, 3, cell_size=256, refine="threshold", rng=rng)
    normalised = minmax_normalise(attention, tissue)
    noise = np.random.default_rng(11).uniform(0, 1, attention.shape)
    score = np.where(tiles.mask, noise + normalised, -np.inf)
    assert tuple(tiles.cells[0]) == np.unravel_index(np.argmax(score), score.shape)
    assert math.isclose(tiles.score[0], score.max())


def test_without_noise_and_distance_the_tiles_are_the_top_n_attention_cells():
    attention, tissue = blob_slide()
    tiles = sample_tiles(
        attention, tissue, 5, cell_size=256, refine="none", noise=(0, 0), distance=0, rng=0
    )
    top = np.argsort(-attention.ravel(), kind="stable")[:5]
    np.testing.assert_array_equal(tiles.cells[:, 0] * attention.shape[1] + tiles.cells[:, 1], top)


def test_threshold_sampling_stays_in_the_blob():
    attention, tissue = blob_slide()
    tiles = sample_tiles(attention, tissue, 4, cell_size=256, distance=1.0, rng=5)
    assert tiles.mask[tiles.cells[:, 0], tiles.cells[:, 1]].all() and tiles.from_mask.all()
    assert np.all((tiles.cells >= [5, 12]) & (tiles.cells < [9, 17]))


def test_negative_noise_never_chooses_outside_tissue_or_the_mask():
    attention, tissue = three_levels()
    for seed in range(20):
        tiles = sample_tiles(
            attention, tissue, 3, cell_size=96, refine="kmeans", noise=(-2, 1), rng=seed, distance=1
        )
        r, c = tiles.cells.T
        assert tissue[r, c].all() and tiles.mask[r, c].all() and len(tiles) == 3
    # 70 of the 100 tissue cells: many have F < 0, below the paper's literal F = 0 off the
    # mask, yet no background cell is chosen.
    for seed in range(10):
        tiles = sample_tiles(
            attention, tissue, 70, cell_size=96, refine="none", noise=(-2, 1), distance=0, rng=seed
        )
        assert len(tiles) == 70 and tissue[tiles.cells[:, 0], tiles.cells[:, 1]].all()
        assert np.sum(tiles.score < 0) > 10


def test_noise_is_drawn_inside_the_mask_only():
    attention, tissue = blob_slide()
    tiles = sample_tiles(attention, tissue, 2, cell_size=256, noise=(5, 6), distance=1, rng=2)
    # Every candidate score in the mask is Â + noise in [5, 7]; nothing outside the mask
    # reaches the tiles (the rest of the tissue was not needed).
    assert np.all((tiles.score >= 5) & (tiles.score <= 7)) and tiles.from_mask.all()


def test_same_seed_same_tiles_other_seed_other_tiles():
    attention, tissue = blob_slide()

    def draw(rng):
        return sample_tiles(attention, tissue, 5, cell_size=256, refine="none", rng=rng).cells

    np.testing.assert_array_equal(draw(7), draw(7))
    np.testing.assert_array_equal(draw(np.random.default_rng(7)), draw(7))
    assert not np.array_equal(draw(7), draw(8))


def test_fewer_tiles_than_asked_when_the_tissue_is_small():
    tissue = np.zeros((10, 10), dtype=bool)
    tissue[4:6, 4:7] = True  # 2 x 3 cells
    attention = tissue / tissue.sum()
    # Constant attention and no noise: raster order, so the walk keeps a checkerboard.
    tiles = sample_tiles(
        attention, tissue, 4, cell_size=256, refine="none", noise=(0, 0), distance=1, rng=0
    )
    assert len(tiles) == 3 and tiles.requested == 4 and tiles.depth == 6
    assert "only 3 of 4" in tiles.note
    np.testing.assert_array_equal(tiles.cells, [[4, 4], [4, 6], [5, 5]])
    assert tiles.boxes.shape == (3, 4)


def test_a_walk_past_the_papers_pool_of_2n_is_reported():
    attention, tissue = blob_slide()
    settings = {"cell_size": 256, "refine": "none", "distance": 3, "rng": 3}
    tiles = sample_tiles(attention, tissue, 6, **settings)
    assert tiles.depth > 12 and "the top 12 cells" in tiles.note
    wide = sample_tiles(attention, tissue, 6, candidates=tiles.depth, **settings)
    np.testing.assert_array_equal(wide.cells, tiles.cells)  # the pool changes no tile
    assert wide.note == ""


def test_a_small_mask_is_filled_from_the_rest_of_the_tissue_and_said_so():
    attention, tissue = blob_slide()  # the blob is 4 x 5 cells
    tiles = sample_tiles(attention, tissue, 5, cell_size=256, distance=2.5, rng=1)
    assert len(tiles) == 5 and tissue[tiles.cells[:, 0], tiles.cells[:, 1]].all()
    assert tiles.from_mask[0] and not tiles.from_mask.all()
    assert np.all(np.diff(tiles.from_mask.astype(int)) <= 0)  # mask tiles come first
    assert "from other tissue" in tiles.note
    strict = sample_tiles(
        attention, tissue, 5, cell_size=256, distance=2.5, rng=1, fill_from_tissue=False
    )
    assert strict.from_mask.all() and len(strict) < 5 and "only" in strict.note


def test_the_rest_of_the_tissue_fills_in_attention_order_whatever_the_noise():
    """Outside m the paper puts no noise: the fill follows the attention, so a slide
    whose attention lies on a tumour wider than m keeps its tiles on that tumour."""
    tissue = np.zeros((12, 16), dtype=bool)
    tissue[1:11, 1:15] = True
    attention = np.where(tissue, 1.0, 0.0)
    attention[2:6, 2:10] = 4.0  # the tumour: 4 x 8 cells of attention above the rest
    attention[3, 5] = 40.0  # one peak, so Otsu's mask is that one cell
    attention /= attention.sum()
    picks = [
        sample_tiles(attention, tissue, 5, cell_size=256, distance=1.5, rng=seed)
        for seed in range(4)
    ]
    for tiles in picks:
        assert tiles.from_mask[0] and not tiles.from_mask[1:].any()
        filled = tiles.normalised[1:]
        assert np.all(np.diff(filled) <= 0)  # highest attention first
        assert np.all((tiles.cells[:, 0] >= 2) & (tiles.cells[:, 0] < 6))  # on the tumour
        assert np.all((tiles.cells[:, 1] >= 2) & (tiles.cells[:, 1] < 10))


def test_a_fallback_mask_is_reported():
    tissue = np.ones((6, 6), dtype=bool)
    tiles = sample_tiles(
        tissue / 36, tissue, 2, cell_size=32, tile_size=64, refine="threshold", rng=0
    )
    assert len(tiles) == 2 and "left no cell" in tiles.note


def test_cells_map_to_level0_boxes_centred_on_the_cell():
    # Cell (2, 3) with 256 px cells: centre (3.5 * 256, 2.5 * 256) = (896, 640).
    boxes = cells_to_boxes(np.array([[2, 3]]), cell_size=256, tile_size=512, origin=(100, 40))
    np.testing.assert_array_equal(boxes, [[100 + 896 - 256, 40 + 640 - 256, 512, 512]])
    # (x, y) cell sizes and (w, h) tiles.
    boxes = cells_to_boxes(np.array([[1, 1]]), cell_size=(10, 20), tile_size=(4, 6))
    np.testing.assert_array_equal(boxes, [[15 - 2, 30 - 3, 4, 6]])


def test_boxes_are_shifted_not_cropped_into_the_slide():
    cells = np.array([[0, 0], [9, 9], [0, 9]])
    boxes = cells_to_boxes(cells, cell_size=256, tile_size=2048, slide_size=(2560, 2400))
    np.testing.assert_array_equal(
        boxes, [[0, 0, 2048, 2048], [512, 352, 2048, 2048], [512, 0, 2048, 2048]]
    )
    assert np.all(boxes[:, :2] >= 0)
    assert np.all(boxes[:, 0] + boxes[:, 2] <= 2560) and np.all(boxes[:, 1] + boxes[:, 3] <= 2400)


def test_sample_tiles_boxes_follow_cells():
    attention, tissue = blob_slide()
    tiles = sample_tiles(
        attention, tissue, 3, cell_size=256, rng=0, origin=(7, 9), slide_size=(6000, 5000)
    )
    expected = cells_to_boxes(
        tiles.cells, cell_size=256, tile_size=2048, origin=(7, 9), slide_size=(6000, 5000)
    )
    np.testing.assert_array_equal(tiles.boxes, expected)


@pytest.mark.parametrize(
    "kw",
    [{"n": 0}, {"noise": (1.0, 0.0)}, {"distance": -1.0}, {"cell_size": 0}, {"candidates": 0}],
)
def test_bad_sampling_settings_are_refused(kw):
    attention, tissue = blob_slide()
    settings = {"n": 2, "cell_size": 256} | kw
    n = settings.pop("n")
    with pytest.raises(ValueError):
        sample_tiles(attention, tissue, n, **settings)


# -- random-sampling baseline -------------------------------------------------------------
def test_random_tiles_cover_the_tissue_uniformly_and_never_the_background():
    tissue = np.zeros((5, 6), dtype=bool)
    tissue[1:4, 1:5] = True  # 12 cells
    counts = np.zeros(tissue.shape)
    rng = np.random.default_rng(0)
    draws = 1200
    for _ in range(draws):
        tiles = random_tiles(tissue, 2, cell_size=64, rng=rng)
        assert len(tiles) == 2 and len({tuple(c) for c in tiles.cells}) == 2
        np.add.at(counts, (tiles.cells[:, 0], tiles.cells[:, 1]), 1)
    assert counts[~tissue].sum() == 0
    expected = draws * 2 / 12  # 200 per cell
    chi2 = (((counts[tissue] - expected) ** 2) / expected).sum()
    assert chi2 < 35  # 11 degrees of freedom: p < 0.001 beyond 31.3
    assert np.all(tiles.attention == 1 / 12) and np.all(tiles.normalised == 1)


def test_random_tiles_honour_distance_and_seed():
    tissue = np.ones((8, 8), dtype=bool)
    a = random_tiles(tissue, 4, cell_size=32, rng=3, distance=2)
    b = random_tiles(tissue, 4, cell_size=32, rng=3, distance=2)
    np.testing.assert_array_equal(a.cells, b.cells)
    assert np.all(pairwise_distances(a.cells) > 2)
    few = random_tiles(tissue[:2, :2], 9, cell_size=32, rng=0)
    assert len(few) == 4 and "only 4 of 9" in few.note


# -- attention sampling: sampler and estimator --------------------------------------------
def sequences(attention: torch.Tensor, n: int):
    """Every ordered sequence of n distinct positions with its probability under
    sequential sampling without replacement from ``attention`` (P,)."""
    a = attention.detach()
    for sequence in itertools.permutations(range(len(a)), n):
        probability, remaining = 1.0, 1.0
        for i in sequence:
            probability *= float(a[i]) / remaining
            remaining -= float(a[i])
        yield torch.tensor([sequence]), probability


def brute_force(estimator, n_positions: int, n: int, seed: int):
    """Exact expectation of an estimator's value and autograd gradients (w.r.t. the
    attention logits and the values), and the exact targets Σ a f and its gradients."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_positions, generator=g, dtype=torch.float64).requires_grad_()
    f = torch.randn(n_positions, 2, generator=g, dtype=torch.float64).requires_grad_()
    probe = torch.randn(2, generator=g, dtype=torch.float64)  # a scalar loss <probe, ·>
    exact = (torch.softmax(logits, 0)[:, None] * f).sum(0)  # Σ a_i f_i, (D,)
    exact_grads = torch.autograd.grad((probe * exact).sum(), (logits, f))
    value = torch.zeros(2, dtype=torch.float64)
    grads = [torch.zeros_like(logits), torch.zeros_like(f)]
    total = 0.0
    for indices, probability in sequences(torch.softmax(logits, 0), n):
        attention = torch.softmax(logits, 0)[None]  # (1, P)
        estimate = estimator(attention, indices, f[indices])[0]  # (D,)
        step = torch.autograd.grad((probe * estimate).sum(), (logits, f))
        value += probability * estimate.detach()
        grads[0] += probability * step[0]
        grads[1] += probability * step[1]
        total += probability
    assert math.isclose(total, 1.0, rel_tol=1e-12)
    return (value, *grads), (exact.detach(), *exact_grads)


@pytest.mark.parametrize(("n_positions", "n"), [(4, 2), (4, 3), (5, 2), (5, 3), (4, 4)])
def test_estimator_value_and_gradients_are_unbiased_by_brute_force(n_positions, n):
    for seed in range(3):
        mean, exact = brute_force(expected_without_replacement, n_positions, n, seed)
        for got, want, name in zip(mean, exact, ("value", "d/dlogits", "d/dvalues"), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)


class InclusivePort(torch.autograd.Function):
    """The hand-written expectation of public PyTorch ports of attention sampling, with
    INCLUSIVE cumulative sums (for the test that the brute force catches it)."""

    @staticmethod
    def forward(ctx, a, f):  # a (B, N), f (B, N, D)
        mass = 1 - torch.cumsum(a, 1)  # inclusive: should exclude the current draw
        terms = torch.cumsum(a[..., None] * f, 1) + mass[..., None] * f
        ctx.save_for_backward(a, f, mass, terms)
        return terms.mean(1)

    @staticmethod
    def backward(ctx, grad):
        a, f, mass, terms = ctx.saved_tensors
        n = a.shape[1]
        k = torch.arange(n, dtype=a.dtype).view(1, n, 1)
        ga = terms / (a / mass)[..., None] + torch.cumsum(f, 1) - k * f
        ga = (grad[:, None] * ga).sum(-1) / n
        gf = (mass[..., None] + k.flip(1) * a[..., None]) / n * grad[:, None]
        return ga, gf


def inclusive_port(attention, indices, values):
    return InclusivePort.apply(attention.gather(1, indices), values)


def test_the_inclusive_cumsum_port_fails_the_brute_force_check():
    mean, exact = brute_force(inclusive_port, 5, 3, seed=0)
    # Its value happens to be right (the two inclusive sums cancel) ...
    torch.testing.assert_close(mean[0], exact[0], rtol=1e-10, atol=1e-12)
    # ... but both gradients are biased.
    for got, want in zip(mean[1:], exact[1:], strict=True):
        with pytest.raises(AssertionError):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_estimator_shapes_and_extra_feature_dimensions():
    attention = torch.softmax(torch.randn(3, 10), 1)
    indices = sample_without_replacement(attention, 4, torch.Generator().manual_seed(0))
    values = torch.randn(3, 4, 2, 5)
    out = expected_without_replacement(attention, indices, values)
    assert out.shape == (3, 2, 5)
    flat = expected_without_replacement(attention, indices, values.flatten(2))
    torch.testing.assert_close(out.flatten(1), flat)
    with pytest.raises(ValueError, match="values must be"):
        expected_without_replacement(attention, indices, values[:, :3])


def test_sampler_draws_ordered_pairs_with_the_sequential_probabilities():
    attention = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    rows = 40_000
    drawn = sample_without_replacement(
        attention.expand(rows, 4).contiguous(), 2, torch.Generator().manual_seed(0)
    )
    assert not (drawn == 3).any()  # zero attention is never drawn
    assert (drawn[:, 0] != drawn[:, 1]).all()
    for indices, probability in sequences(attention[:3], 2):
        pair = indices[0]
        frequency = ((drawn[:, 0] == pair[0]) & (drawn[:, 1] == pair[1])).double().mean()
        sigma = math.sqrt(probability * (1 - probability) / rows)
        assert abs(float(frequency) - probability) < 5 * sigma


def test_sampler_is_reproducible_and_refuses_too_many_positions():
    attention = torch.softmax(torch.randn(2, 9), 1)
    a = sample_without_replacement(attention, 5, torch.Generator().manual_seed(4))
    b = sample_without_replacement(attention, 5, torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b)
    assert a.shape == (2, 5) and a.dtype == torch.int64
    sparse = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    with pytest.raises(ValueError, match="cannot draw 3"):
        sample_without_replacement(sparse, 3)


def test_sampled_estimate_converges_to_the_full_sum():
    # End to end: sampler + estimator, averaged over many draws in one batch.
    g = torch.Generator().manual_seed(1)
    attention = torch.softmax(torch.randn(1, 30, generator=g, dtype=torch.float64), 1)
    f = torch.randn(30, 3, generator=g, dtype=torch.float64)
    rows = 4000
    many = attention.expand(rows, 30).contiguous()
    indices = sample_without_replacement(many, 6, g)
    estimates = expected_without_replacement(many, indices, f[indices])  # (rows, 3)
    exact = attention[0] @ f
    error = estimates.mean(0) - exact
    assert torch.all(error.abs() < 5 * estimates.std(0) / math.sqrt(rows))
