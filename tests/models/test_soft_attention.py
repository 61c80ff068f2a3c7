"""Soft attention model (Raza et al. Sec. III-A, III-C): architecture, tissue-masked
softmax, grid shapes, tissue pooling, entropy and its regulariser."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from napari_slide_attention.models.soft_attention import (
    SoftAttention,
    SoftAttentionConfig,
    attention_entropy,
    entropy_loss,
    pool_tissue,
    tissue_softmax,
)


def small_model(**kw) -> SoftAttention:
    torch.manual_seed(0)
    model = SoftAttention(SoftAttentionConfig(layers=2, channels=4, pool=4, **kw))
    # f_a starts at zero (uniform attention); give it weights so the maps have structure.
    nn.init.normal_(model.score.weight, std=1.0)
    return model


def views(batch: int = 2, height: int = 16, width: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, height, width, generator=g)
    tissue = torch.zeros(batch, height, width, dtype=torch.bool)
    tissue[:, 2:, : width // 2 + 3] = True
    return image, tissue


@pytest.mark.parametrize(
    "kw",
    [
        {"layers": 0},
        {"channels": 0},
        {"kernel": 2},
        {"pool": 0},
        {"min_tissue": 0.0},
        {"min_tissue": 1.5},
        {"entropy_weight": -1.0},
        {"mean": (0.5, 0.5)},
        {"std": (0.25, 0.0, 0.25)},
        {"in_channels": 1},  # mean/std still have 3 values
    ],
)
def test_config_refuses_bad_values(kw):
    with pytest.raises(ValueError):
        SoftAttentionConfig(**kw)


def test_papers_architecture_her2_and_mmr():
    her2 = SoftAttention(SoftAttentionConfig())
    convs = [m for m in her2.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32, 64]
    assert all(isinstance(m, nn.ReLU) for m in her2.features[1::2])
    assert her2.pool.kernel_size == 8 and her2.pool.stride == 8 and her2.cell_size == 8
    assert her2.score.in_channels == 64 and her2.score.kernel_size == (1, 1)
    mmr = SoftAttention(SoftAttentionConfig(layers=5, pool=3))
    convs = [m for m in mmr.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32, 64, 128] and mmr.cell_size == 3


def test_attention_is_a_distribution_over_tissue_cells_only():
    model = small_model()
    image, tissue = views()
    out = model(image, tissue)
    assert out.attention.shape == out.logits.shape == out.tissue.shape == (2, 4, 4)
    torch.testing.assert_close(out.attention.sum(dim=(1, 2)), torch.ones(2))
    assert torch.all(out.attention[~out.tissue] == 0)
    assert torch.all(out.attention[out.tissue] > 0)
    assert out.attention[out.tissue].std() > 0  # not uniform once f_a has weights
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.attention = out.attention  # type: ignore[misc]


def test_untrained_model_attends_uniformly_over_tissue():
    model = SoftAttention(SoftAttentionConfig(layers=2, channels=4, pool=4))
    image, tissue = views()
    out = model(image, tissue)
    n = out.tissue.flatten(1).sum(1, keepdim=True)  # (B, 1)
    expected = out.tissue.flatten(1) / n
    torch.testing.assert_close(out.attention.flatten(1), expected)


@pytest.mark.parametrize(("height", "width"), [(19, 13), (16, 17), (5, 6), (8, 8)])
def test_grid_is_the_ceiling_of_size_over_pool(height, width):
    model = small_model()
    image, tissue = views(1, height, width)
    tissue[:] = True
    out = model(image, tissue)
    expected = (math.ceil(height / 4), math.ceil(width / 4))
    assert model.grid_shape(height, width) == expected
    assert tuple(out.attention.shape[1:]) == expected
    assert out.tissue.all()  # partial edge cells are whole tissue here


def test_a_cell_is_tissue_when_most_of_its_pixels_inside_the_image_are():
    tissue = torch.zeros(1, 6, 8, dtype=torch.bool)  # pool 4: grid 2 x 2, last row partial
    tissue[0, 0:2, 0:4] = True  # cell (0, 0): 8 of 16 pixels, half -> tissue
    tissue[0, 0, 4:8] = True
    tissue[0, 1, 4:7] = True  # cell (0, 1): 7 of 16 -> not tissue
    tissue[0, 4, 0:4] = True  # cell (1, 0): 4 of the 8 pixels inside the image -> tissue
    tissue[0, 4, 4:7] = True  # cell (1, 1): 3 of 8 -> not tissue
    cells = pool_tissue(tissue, 4, 0.5)
    assert cells.tolist() == [[[True, False], [True, False]]]
    assert pool_tissue(tissue, 4, 1e-9).all()  # "any pixel" with a tiny threshold
    assert not pool_tissue(tissue, 4, 1.0).any()


def test_masked_softmax_is_stable_with_large_logits():
    logits = torch.tensor([[[1e4, -1e4, 3e4], [2e4, 5.0, 3e4 - 1.0]]])  # (1, 2, 3)
    tissue = torch.tensor([[[True, True, False], [True, True, True]]])
    attention = tissue_softmax(logits, tissue)
    assert torch.isfinite(attention).all()
    reference = torch.softmax(logits.double()[tissue], dim=0)
    torch.testing.assert_close(attention[tissue].double(), reference, rtol=1e-6, atol=1e-12)
    assert attention[0, 0, 2] == 0  # the largest logit is off tissue
    logits.requires_grad_(True)
    attention = tissue_softmax(logits, tissue)
    (attention * torch.arange(6.0).view(1, 2, 3)).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_an_image_without_tissue_cells_is_refused():
    model = small_model()
    image, tissue = views(2)
    tissue[1] = False
    with pytest.raises(ValueError, match=r"no tissue cell .* \[1\]"):
        model(image, tissue)
    # A few tissue pixels, but no cell where they are the majority.
    tissue = torch.zeros(1, 16, 16, dtype=torch.bool)
    tissue[0, ::4, ::4] = True
    with pytest.raises(ValueError, match="no tissue cell"):
        model(image[:1], tissue)


def test_shape_mismatches_are_refused():
    model = small_model()
    image, tissue = views()
    with pytest.raises(ValueError, match="image must be"):
        model(image[:, :2], tissue)
    with pytest.raises(ValueError, match="tissue must be"):
        model(image, tissue[:, :-1])


def test_uint8_input_is_scaled_like_floats():
    model = small_model()
    image, tissue = views()
    as_bytes = (image * 255).round().to(torch.uint8)
    a = model(as_bytes, tissue).attention
    b = model(as_bytes.float() / 255, tissue).attention
    torch.testing.assert_close(a, b)


def test_entropy_of_uniform_is_log_n_and_of_one_hot_is_zero():
    tissue = torch.zeros(2, 3, 4, dtype=torch.bool)
    tissue[0, :2] = True  # 8 cells
    tissue[1, 1, 1] = True  # 1 cell
    attention = tissue / tissue.flatten(1).sum(1).view(2, 1, 1)
    entropy = attention_entropy(attention, tissue)
    torch.testing.assert_close(entropy, torch.tensor([math.log(8), 0.0]))
    peaked = torch.zeros(1, 3, 4)
    peaked[0, 0, 0] = 1.0
    assert attention_entropy(peaked, torch.ones(1, 3, 4, dtype=torch.bool)).item() == 0


def test_entropy_gradient_has_no_nan_where_probabilities_are_zero():
    logits = torch.randn(1, 3, 4, requires_grad=True)
    tissue = torch.zeros(1, 3, 4, dtype=torch.bool)
    tissue[0, 1:] = True
    attention = tissue_softmax(logits, tissue)
    entropy_loss(attention, tissue).backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.all(logits.grad[~tissue] == 0)


def test_a_gradient_step_on_the_entropy_loss_spreads_the_attention():
    model = small_model(entropy_weight=1.0)
    image, tissue = views()
    before = model(image, tissue)
    loss = model.entropy_loss(before)
    torch.testing.assert_close(loss, -attention_entropy(before.attention, before.tissue).mean())
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
    after = model(image, tissue)
    gain = attention_entropy(after.attention, after.tissue) - attention_entropy(
        before.attention, before.tissue
    )
    assert torch.all(gain > 0)
    # The weight β scales the loss.
    torch.testing.assert_close(
        entropy_loss(before.attention, before.tissue, 0.5), 0.5 * loss.detach()
    )


@pytest.mark.parametrize(
    "config",
    [SoftAttentionConfig(), SoftAttentionConfig(layers=5, pool=3, kernel=5)],
    ids=["her2", "mmr"],
)
def test_logits_in_strips_are_those_of_one_pass(config):
    """A large view runs in strips of rows with a halo (bounded memory): every cell must
    get the logit it gets from the whole view, at the strips' seams too."""
    torch.manual_seed(0)
    model = SoftAttention(config).eval()
    torch.nn.init.normal_(model.score.weight)  # (zeros at init: every logit alike)
    image = torch.randint(0, 256, (2, 3, 203, 157), dtype=torch.uint8)
    whole = model.cell_logits(image, strip_pixels=10**9)
    assert whole.shape == (2, *model.grid_shape(203, 157))
    for strip_pixels in (1, 1000, 20_000):  # one cell row per strip, a few, two strips
        torch.testing.assert_close(model.cell_logits(image, strip_pixels), whole)
    as_float = image.float() / 255
    torch.testing.assert_close(model.cell_logits(as_float, 1000), whole)
