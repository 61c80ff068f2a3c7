"""The soft attention's feature network sees a training step's slides as one batch.

Its batch normalisation then takes statistics over the step's slides (mixed classes): per
slide, it would subtract each slide's mean, so two slides that differ only in their
staining level (HER2 0 against 3+) would give the same class scores, and the model would
learn nothing that holds on new slides (the first IHC benchmark run)."""

from __future__ import annotations

import torch

from napari_slide_attention.models.dual_attention import DualAttention, DualAttentionConfig
from tiny_models import TINY_HARD

SMALL = {"n_tiles": 4, "tile_um": 64.0, "feature_px": 32, "feature_width": 8}


def _model() -> DualAttention:
    torch.manual_seed(0)
    config = DualAttentionConfig(
        classes=("0", "3+"), soft={"pool": 2}, hard=dict(TINY_HARD), **SMALL
    )
    return DualAttention(config)


def _view(model: DualAttention, level: int):
    view = torch.full((1, 8, 8, 3), level, dtype=torch.uint8)
    out = model.attend(view, torch.ones(1, 8, 8, dtype=torch.bool))
    return out, torch.arange(4)[None]


def _tiles(model: DualAttention, level: int, seed: int) -> torch.Tensor:
    """Four tiles of one staining level with the same texture on top."""
    texture = torch.randint(0, 40, (4, 32, 32, 3), generator=torch.Generator().manual_seed(seed))
    return model.prepare((texture + level).to(torch.uint8))


def test_slides_differing_only_in_stain_level_score_differently_in_training():
    model = _model().train()
    pale, dark = _view(model, 200), _view(model, 90)
    tiles = [_tiles(model, 180, 1), _tiles(model, 60, 1)]
    labels = torch.tensor([0, 1])
    losses = model.soft_losses([pale[0], dark[0]], tiles, [pale[1], dark[1]], labels)
    together = (losses[0].logits - losses[1].logits).abs().max()
    # one slide at a time, the batch statistics erase nearly all of the difference
    alone = [model.soft_loss(v[0], t, v[1], labels[i : i + 1]) for i, (v, t) in
             enumerate(zip((pale, dark), tiles, strict=True))]  # fmt: skip
    apart = (alone[0].logits - alone[1].logits).abs().max()
    assert together > 5 * apart, (float(together), float(apart))


def test_a_step_of_slides_gives_each_slides_own_loss_at_evaluation():
    model = _model().eval()
    views = [_view(model, 200), _view(model, 90), _view(model, 140)]
    tiles = [_tiles(model, 180, 1), _tiles(model, 60, 2), _tiles(model, 120, 3)]
    labels = torch.tensor([0, 1, 1])
    with torch.no_grad():
        together = model.soft_losses([v[0] for v in views], tiles, [v[1] for v in views], labels)
        for i, (view, t) in enumerate(zip(views, tiles, strict=True)):
            alone = model.soft_loss(view[0], t, view[1], labels[i : i + 1])
            torch.testing.assert_close(together[i].logits, alone.logits)
            torch.testing.assert_close(together[i].total, alone.total)
