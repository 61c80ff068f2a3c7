"""Grid attention: the paper's equations, its Conv3d formulation, chunked training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from napari_slide_attention.models.grid_attention import (
    GridAttention,
    GridAttentionConfig,
    cells_to_grid,
)

CLASSES = ("normal", "low-grade", "high-grade", "carcinoma")


def small_model(**kw) -> GridAttention:
    torch.manual_seed(0)
    config = GridAttentionConfig(classes=CLASSES, n_maps=8, input_px=32, dropout=0.0, **kw)
    return GridAttention(config)


def grid_tiles(n: int = 10, size: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tiles = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)
    cells = torch.tensor([0, 1, 2, 4, 5, 6, 8, 9, 10, 13][:n])
    return tiles, cells, (4, 4)


def test_attention_equals_the_papers_literal_conv3d():
    model = small_model()
    u = torch.randn(1, 512, 5, 7)
    # The paper: m filters of 512 x 3 x 3 as a 3-D convolution over (1, 1, 512, H', W').
    conv3d = nn.Conv3d(1, 8, (512, 3, 3), padding=(0, 1, 1))
    with torch.no_grad():
        conv3d.weight.copy_(model.attention.weight[:, None])  # (m, 1, 512, 3, 3)
        conv3d.bias.copy_(model.attention.bias)
    literal = conv3d(u[:, None])[:, :, 0]  # (1, m, H', W')
    torch.testing.assert_close(model.attention(u), literal, rtol=1e-4, atol=1e-4)


def test_batched_2d_trunk_equals_the_papers_1x3x3_conv3d_over_tiles():
    # The paper batches tiles by turning each 2-D conv into a 1 x k x k 3-D conv over a
    # (1, C, tiles, h, w) volume; folding tiles into the batch of a Conv2d is the same.
    conv2d = nn.Conv2d(3, 16, 3, padding=1)
    conv3d = nn.Conv3d(3, 16, (1, 3, 3), padding=(0, 1, 1))
    with torch.no_grad():
        conv3d.weight.copy_(conv2d.weight[:, :, None])
        conv3d.bias.copy_(conv2d.bias)
    tiles = torch.randn(6, 3, 20, 20)
    volume = tiles.permute(1, 0, 2, 3)[None]  # (1, 3, tiles, h, w)
    literal = conv3d(volume)[0].permute(1, 0, 2, 3)
    torch.testing.assert_close(conv2d(tiles), literal, rtol=1e-5, atol=1e-5)


def test_softmax_runs_over_tissue_positions_only_and_eq2_weights_u():
    model = small_model()
    u = torch.randn(1, 512, 3, 4)
    tissue = torch.zeros(1, 3, 4, dtype=torch.bool)
    tissue[0, 1:, 1:3] = True
    u = u * tissue[:, None]
    logits, maps, scores = model.attend(u, tissue)
    assert maps.shape == (1, 8, 3, 4) and scores.shape == (1, 8, 3, 4)
    torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(1, 8))
    assert torch.all(maps[:, :, ~tissue[0]] == 0)
    assert torch.isinf(scores[:, :, ~tissue[0]]).all()
    # Eq. (2) by hand for map 3, then the classifier on the concatenation.
    z = torch.stack([(maps[0, k] * u[0]).sum(dim=(1, 2)) for k in range(8)])  # (m, 512)
    torch.testing.assert_close(logits[0], model.classifier(z.flatten()), rtol=1e-4, atol=1e-4)


def test_a_grid_without_tissue_is_refused():
    model = small_model()
    with pytest.raises(ValueError, match="no tissue"):
        model.attend(torch.zeros(1, 512, 2, 2), torch.zeros(1, 2, 2, dtype=torch.bool))


def test_paper_initialisation():
    model = small_model()
    fc = model.classifier[-1]
    bound = (6 / (fc.in_features + fc.out_features)) ** 0.5
    assert fc.weight.abs().max() <= bound and fc.weight.std() > bound / 4  # Glorot uniform
    assert torch.all(fc.bias == 0) and torch.all(model.attention.bias == 0)
    bn = model.trunk.layer1[0].bn1
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_only_the_last_block_trains_by_default():
    model = small_model()
    names = {
        n.split(".")[1]
        for n, p in model.named_parameters()
        if p.requires_grad and n.startswith("trunk.")
    }
    assert names == {"layer4", "final_bn"}
    model.train()
    assert not model.trunk.layer3.training and model.trunk.layer4.training


@pytest.mark.parametrize("trainable_blocks", [0, 1, 2])
@pytest.mark.parametrize("chunk", [3, 10])
def test_chunked_two_pass_step_gives_the_gradients_of_plain_autograd(trainable_blocks, chunk):
    tiles, cells, shape = grid_tiles()
    reference = small_model(trainable_blocks=trainable_blocks)
    chunked = small_model(trainable_blocks=trainable_blocks)
    chunked.load_state_dict(reference.state_dict())
    # eval-mode BN so that the chunking does not change batch statistics
    reference.eval()
    chunked.eval()
    out = reference(tiles, cells, shape)
    loss = nn.functional.cross_entropy(out.logits[None], torch.tensor([2])) * 0.5
    loss.backward()

    def chunks():
        return (tiles[i : i + chunk] for i in range(0, len(tiles), chunk))

    step = chunked.train_step(chunks, cells, shape, target=2, loss_scale=0.5)
    assert step.loss == pytest.approx(float(loss.detach()), rel=1e-5)
    params = dict(chunked.named_parameters())
    trained = [n for n, p in reference.named_parameters() if p.requires_grad]
    assert any(n.startswith("trunk.") for n in trained) == (trainable_blocks > 0)
    for name in trained:
        torch.testing.assert_close(
            params[name].grad,
            dict(reference.named_parameters())[name].grad,
            rtol=1e-4,
            atol=1e-6,
            msg=name,
        )


def test_cached_frozen_features_give_the_same_gradients():
    tiles, cells, shape = grid_tiles()
    a, b = small_model(), small_model()
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()

    def chunks():
        return (tiles[i : i + 4] for i in range(0, len(tiles), 4))

    a.train_step(chunks, cells, shape, target=1)
    b.train_step(chunks, cells, shape, target=1, cache_bytes=1 << 30)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        if pa.requires_grad:
            torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def test_changing_chunks_between_passes_is_caught():
    tiles, cells, shape = grid_tiles()
    model = small_model()
    calls = iter([tiles, tiles[:5]])

    with pytest.raises(RuntimeError, match="changed between passes"):
        model.train_step(lambda: [next(calls)], cells, shape, target=0)


def test_train_mode_batchnorm_is_updated_once_per_step():
    tiles, cells, shape = grid_tiles()
    model = small_model()
    model.train()
    bn = model.trunk.layer4[0].bn1
    before = bn.running_mean.clone()
    model.train_step(lambda: [tiles[:5], tiles[5:]], cells, shape, target=0)
    once = small_model()
    once.train()
    with torch.no_grad():
        for chunk in (tiles[:5], tiles[5:]):
            once.embed(chunk)
    assert not torch.equal(before, bn.running_mean)
    torch.testing.assert_close(bn.running_mean, once.trunk.layer4[0].bn1.running_mean)


def test_predict_chunks_matches_forward_and_scatter_places_cells():
    tiles, cells, shape = grid_tiles()
    model = small_model().eval()
    full = model(tiles, cells, shape)
    chunked = model.predict_chunks([tiles[:4], tiles[4:]], cells, shape)
    torch.testing.assert_close(chunked.logits, full.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(chunked.maps, full.maps, rtol=1e-4, atol=1e-6)
    u, tissue = cells_to_grid(full.features, cells, shape)
    assert tissue.flatten().nonzero().flatten().tolist() == cells.tolist()
    torch.testing.assert_close(u[0, :, 2, 1], full.features[list(cells).index(9)])


def test_calibration_sets_frozen_batchnorm_statistics():
    tiles, _, _ = grid_tiles()
    model = small_model()
    assert model.calibrate_frozen_batchnorm([tiles[:5], tiles[5:]]) == 10
    bn = model.trunk.layer1[0].bn1
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


def test_config_round_trip_and_validation():
    config = GridAttentionConfig(classes=CLASSES, risk_order=(0, 1, 2, 3), hidden=(64,))
    assert GridAttentionConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="repeat"):
        GridAttentionConfig(classes=("a", "a"))
    with pytest.raises(ValueError, match="risk_order"):
        GridAttentionConfig(classes=("a", "b"), risk_order=(0, 0))
    with pytest.raises(ValueError, match="unknown"):
        GridAttentionConfig.from_dict({"classes": ["a", "b"], "colour": 1})


def test_map_contributions_sum_to_the_class_scores():
    model = small_model().eval()
    u = torch.randn(2, 512, 3, 3)
    tissue = torch.ones(2, 3, 3, dtype=torch.bool)
    logits, maps, _ = model.attend(u, tissue)
    contributions = model.map_contributions(u, maps)  # (B, C, m)
    assert contributions.shape == (2, 4, 8)
    torch.testing.assert_close(
        contributions.sum(-1) + model.classifier[-1].bias, logits, rtol=1e-4, atol=1e-4
    )


def test_one_pass_step_while_the_graph_fits_gives_the_two_pass_gradients_and_statistics():
    """Train-mode BN: keeping pass 1's graph (all of it, or the first chunk's until the
    budget runs out) changes neither the gradients nor the BN running statistics."""
    from napari_slide_attention.models.grid_attention import _SavedBytes

    tiles, cells, shape = grid_tiles()

    def chunks():
        return (tiles[i : i + 4] for i in range(0, len(tiles), 4))

    probe = small_model()
    probe.train()
    counter = _SavedBytes(0)
    with counter:
        probe.trainable_features(probe.frozen_features(probe.prepare(tiles[:4])))
    assert counter.saved > 0
    reference = small_model()
    reference.train()
    reference.train_step(chunks, cells, shape, target=1, cache_bytes=0)
    # all of it fits: 3 chunk passes; only the first chunk: 3 + 3 again in pass 2
    for budget, passes in ((1 << 30, 3), (int(counter.saved * 1.5), 6)):
        model = small_model()
        model.train()
        calls = []
        embed = model.trainable_features
        model.trainable_features = lambda h, embed=embed, calls=calls: calls.append(1) or embed(h)
        model.train_step(chunks, cells, shape, target=1, cache_bytes=budget)
        assert len(calls) == passes
        expected = dict(reference.named_parameters())
        for name, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, expected[name].grad, msg=name)
        torch.testing.assert_close(
            model.trunk.layer4[0].bn1.running_mean, reference.trunk.layer4[0].bn1.running_mean
        )
