"""The sharper soft attention for sparse lesions (our extension, off by default): a softmax
temperature and a top-k that keeps only the k most attended cells. The defaults are the
paper's A; the settings travel with a checkpoint and an older checkpoint still loads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_slide_attention.models.checkpoint import load_model, save_checkpoint
from napari_slide_attention.models.dual_attention import DualAttention, DualAttentionConfig
from napari_slide_attention.models.soft_attention import (
    SoftAttention,
    SoftAttentionConfig,
    attention_entropy,
    sharpen,
    tissue_softmax,
)
from tiny_models import TINY_HARD

SMALL = {
    "n_tiles": 4,
    "tile_um": 64.0,
    "feature_px": 32,
    "feature_width": 8,
    "hard": dict(TINY_HARD),
}


def _map(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 6, 7) logits with one clear peak at (2, 3), and a tissue mask with a hole."""
    logits = torch.randn(1, 6, 7, generator=torch.Generator().manual_seed(seed))
    logits[0, 2, 3] = 4.0
    tissue = torch.ones(1, 6, 7, dtype=torch.bool)
    tissue[0, :, 0] = False
    tissue[0, 5, :] = False
    return logits, tissue


def test_defaults_are_the_papers_softmax_bit_for_bit():
    logits, tissue = _map()
    paper = tissue_softmax(logits, tissue)
    assert torch.equal(sharpen(logits, tissue), paper)
    assert torch.equal(sharpen(logits, tissue, 1.0, 0), paper)
    # a model with the defaults, and one given them explicitly, give the paper's A
    torch.manual_seed(3)
    model = SoftAttention(SoftAttentionConfig(pool=2))
    torch.nn.init.normal_(model.score.weight)  # f_a starts at zero: give it a pattern
    explicit = SoftAttention(SoftAttentionConfig(pool=2, temperature=1.0, top_k=0))
    explicit.load_state_dict(model.state_dict())
    image = torch.rand(1, 3, 12, 14, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(1, 12, 14, dtype=torch.bool)
    out = model(image, mask)
    manual = torch.softmax(out.logits.flatten(1), 1).reshape(out.logits.shape)
    torch.testing.assert_close(out.attention, manual, rtol=0, atol=1e-7)
    assert torch.equal(explicit(image, mask).attention, out.attention)
    assert DualAttentionConfig(classes=("a", "b")).slide_call == "most-frequent"


def test_a_lower_temperature_concentrates_the_attention():
    logits, tissue = _map()
    entropies, peaks = [], []
    for t in (2.0, 1.0, 0.5, 0.25):
        a = sharpen(logits, tissue, temperature=t)
        assert float(a.sum()) == pytest.approx(1.0) and float(a[~tissue].abs().sum()) == 0
        entropies.append(float(attention_entropy(a, tissue)[0]))
        peaks.append(float(a[0, 2, 3]))
        # the order of the cells does not change: only how much the top ones take
        order = torch.argsort(a[tissue], descending=True)
        assert torch.equal(order, torch.argsort(logits[tissue], descending=True))
    assert entropies == sorted(entropies, reverse=True) and entropies[0] > entropies[-1] + 0.5
    assert peaks == sorted(peaks) and peaks[-1] > 0.95
    # T divides the logits: A at T is the paper's A of logits / T
    torch.testing.assert_close(
        sharpen(logits, tissue, temperature=0.5), tissue_softmax(2 * logits, tissue)
    )


def test_top_k_puts_zero_mass_outside_the_k_largest_cells():
    logits, tissue = _map()
    logits[0, 0, 0] = 50.0  # off the tissue: never kept
    a = sharpen(logits, tissue, top_k=5)
    kept = a > 0
    assert int(kept.sum()) == 5 and not bool((kept & ~tissue).any())
    assert float(a.sum()) == pytest.approx(1.0)
    top = torch.topk(logits.masked_fill(~tissue, -math.inf).flatten(), 5).indices
    assert set(kept.flatten().nonzero().flatten().tolist()) == set(top.tolist())
    # inside the k cells the paper's proportions hold (A renormalised over them)
    paper = tissue_softmax(logits, tissue)
    torch.testing.assert_close(a[kept], paper[kept] / paper[kept].sum())
    # with a temperature too: the k cells are the same, their shares sharper
    both = sharpen(logits, tissue, temperature=0.5, top_k=5)
    assert torch.equal(both > 0, kept) and float(both[0, 2, 3]) > float(a[0, 2, 3])


def test_top_k_ties_fewer_cells_and_batches():
    tissue = torch.zeros(2, 3, 4, dtype=torch.bool)
    tissue[0, 1:, :] = True  # 8 cells
    tissue[1, 0, :2] = True  # 2 cells: fewer than k, all kept
    a = sharpen(torch.zeros(2, 3, 4), tissue, top_k=3)
    # equal logits: the first cells in row-major order, each 1/3
    assert a[0].flatten().nonzero().flatten().tolist() == [4, 5, 6]
    torch.testing.assert_close(a[0, 1, :3], torch.full((3,), 1 / 3))
    assert a[1, 0, :2].tolist() == [0.5, 0.5] and float(a[1].sum()) == pytest.approx(1.0)


def test_exploring_draws_k_cells_from_the_attention():
    logits, tissue = _map()
    counts = torch.zeros_like(logits)
    for seed in range(400):
        gen = torch.Generator().manual_seed(seed)
        a = sharpen(logits, tissue, top_k=3, explore=gen)
        assert int((a > 0).sum()) == 3 and not bool((a > 0)[~tissue].any())
        assert float(a.sum()) == pytest.approx(1.0)
        counts += (a > 0).float()
    # the peak (half of A) is nearly always drawn, but cells outside the top 3 are tried too
    assert counts[0, 2, 3] >= 360 and counts[0, 2, 3] == counts.max()
    top3 = sharpen(logits, tissue, top_k=3) > 0
    assert float(counts[tissue & ~top3].sum()) > 100
    again = sharpen(logits, tissue, top_k=3, explore=torch.Generator().manual_seed(7))
    same = sharpen(logits, tissue, top_k=3, explore=torch.Generator().manual_seed(7))
    assert torch.equal(again, same)
    # without top-k there is nothing to draw: the generator changes nothing
    plain = sharpen(logits, tissue, 0.5, 0, explore=torch.Generator().manual_seed(7))
    assert torch.equal(plain, sharpen(logits, tissue, 0.5))


@pytest.mark.parametrize(
    "kw", [{"temperature": 0}, {"temperature": -1.0}, {"temperature": math.inf},
           {"temperature": math.nan}, {"top_k": -1}, {"top_k": 2.5}, {"top_k": True}],
)  # fmt: skip
def test_bad_sharpness_settings_are_refused(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        SoftAttentionConfig(**kw)
    with pytest.raises(ValueError, match=next(iter(kw))):
        DualAttentionConfig(classes=("a", "b"), soft=kw)
    with pytest.raises(ValueError, match="slide_call"):
        DualAttentionConfig(classes=("a", "b"), slide_call="mean")


def test_the_pooled_expectation_over_all_k_cells_is_exact():
    torch.manual_seed(0)
    config = DualAttentionConfig(classes=("a", "b", "c"), soft={"pool": 2, "top_k": 3}, **SMALL)
    model = DualAttention(config)
    torch.nn.init.normal_(model.soft.score.weight)
    view = torch.randint(0, 255, (1, 8, 10, 3), dtype=torch.uint8)
    out = model.attend(view, torch.ones(1, 8, 10, dtype=torch.bool))
    flat = out.attention.flatten(1)
    cells = flat[0].nonzero().flatten()
    assert len(cells) == 3
    tiles = torch.randn(3, 3, 32, 32)
    order = cells[torch.tensor([2, 0, 1])][None]  # any order of the k cells
    loss = model.soft_loss(out, tiles, order, torch.tensor([1]))
    feats = model.features(tiles)
    expected = (flat[0, order[0], None] * feats).sum(0, keepdim=True)
    torch.testing.assert_close(loss.logits, model.head(expected))


def test_checkpoints_keep_the_sharpness_and_older_ones_load_with_the_papers(tmp_path):
    soft = {"pool": 2, "temperature": 0.5, "top_k": 4}
    config = DualAttentionConfig(classes=("a", "b"), soft=soft, slide_call="highest-risk", **SMALL)
    model = DualAttention(config)
    torch.nn.init.normal_(model.soft.score.weight)
    path = save_checkpoint(
        tmp_path / "m.safetensors", config.kind, config.to_dict(), model.state_dict(), {}
    )
    loaded, _ = load_model(path, "cpu")
    assert loaded.soft.config.temperature == 0.5 and loaded.soft.config.top_k == 4
    assert loaded.config.slide_call == "highest-risk"
    view = torch.randint(0, 255, (1, 8, 10, 3), dtype=torch.uint8)
    tissue = torch.ones(1, 8, 10, dtype=torch.bool)
    a = loaded.attend(view, tissue).attention
    assert int((a > 0).sum()) == 4
    torch.testing.assert_close(a, model.attend(view, tissue).attention)

    # a checkpoint written before these settings existed: no keys, the paper's A
    old = config.to_dict()
    old.pop("slide_call")
    old["soft"] = {"pool": 2}
    path = save_checkpoint(tmp_path / "old.safetensors", config.kind, old, model.state_dict(), {})
    loaded, _ = load_model(path, "cpu")
    assert loaded.soft.config.temperature == 1.0 and loaded.soft.config.top_k == 0
    assert loaded.config.slide_call == "most-frequent"
    a = loaded.attend(view, tissue).attention
    assert bool((a > 0).all()) and np.isclose(float(a.detach().sum()), 1.0)
