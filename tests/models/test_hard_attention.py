"""Hard attention (Raza et al. III-D/E): glimpse sensor, inhibition of return, the policy,
the loss terms' values and gradients, and a small task the model must learn to look at."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_slide_attention.models.checkpoint import load_model, save_checkpoint
from napari_slide_attention.models.hard_attention import (
    MODEL_KIND,
    GlimpseEpisode,
    HardAttention,
    HardAttentionConfig,
    box_overlap,
    discounted_returns,
    extract_glimpses,
    glimpse_boxes,
    hard_attention_loss,
    policy_log_prob,
)

CLASSES = ("0", "1+", "2+", "3+")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster than two, and exactly reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**kw) -> HardAttentionConfig:
    settings = dict(
        classes=CLASSES,
        glimpses=3,
        glimpse_px=4,
        scales=(1, 2),
        tile_px=32,
        context_px=16,
        feature=16,
        hidden=(16, 8),
        glimpse_channels=(8,),
        context_channels=(8,),
    )
    settings.update(kw)
    return HardAttentionConfig(**settings)


def tiny_model(seed: int = 0, **kw) -> HardAttention:
    torch.manual_seed(seed)
    return HardAttention(tiny_config(**kw))


def tiles(n: int = 4, size: int = 32, seed: int = 1) -> torch.Tensor:
    """Float tiles in [0.6, 1]: never the normalisation mean 0.5, so never 0 once normalised."""
    gen = torch.Generator().manual_seed(seed)
    return 0.6 + 0.4 * torch.rand(n, 3, size, size, generator=gen)


def episode_of(logits: torch.Tensor, means: torch.Tensor, tile_px: int = 32) -> GlimpseEpisode:
    """An episode made by hand (B, T from the logits), glimpses of 4 px at scales 1 and 2."""
    batch, steps, _ = logits.shape
    return GlimpseEpisode(
        logits=logits,
        locations=means.detach().clamp(-1, 1),
        means=means,
        log_probs=torch.zeros(batch, steps),
        baselines=torch.zeros(batch, steps),
        glimpse_px=4,
        scales=(1.0, 2.0),
        tile_px=tile_px,
    )


# -- settings ---------------------------------------------------------------------------
def test_defaults_are_the_papers_sizes():
    config = HardAttentionConfig(classes=CLASSES)
    assert config.kind == "hard-attention" == MODEL_KIND
    assert (config.glimpses, config.glimpse_px, config.scales) == (6, 128, (1.0, 2.0))
    assert (config.tile_px, config.feature, config.hidden) == (2048, 256, (256, 128))
    assert config.overlap_weight == config.ordinal_weight == config.discount == 1.0
    assert config.inhibition_of_return and config.box_px == 256
    assert config.risk == (0, 1, 2, 3)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"classes": ("a",)}, "at least 2 classes"),
        ({"risk_order": (0, 0, 1, 2)}, "risk_order"),
        ({"glimpses": 0}, "glimpses"),
        ({"glimpse_px": 64}, "glimpse_px"),
        ({"scales": (2, 1)}, "increase"),
        ({"scales": (0.5, 1)}, ">= 1"),
        ({"context_px": 64}, "context_px"),
        ({"hidden": ()}, "hidden"),
        ({"location_std": 0.0}, "location_std"),
        ({"discount": 1.5}, "discount"),
        ({"overlap_weight": -1.0}, "overlap_weight"),
        ({"mean": (0.5,)}, "one value per channel"),
    ],
)
def test_bad_settings_are_refused_with_a_reason(settings, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**settings)


def test_settings_round_trip_through_json_values():
    config = tiny_config(risk_order=None, scales=(1, 1.5, 3), location_std=0.2)
    assert config.risk_order == ()
    again = HardAttentionConfig.from_dict(config.to_dict())
    assert again == config
    with pytest.raises(ValueError, match="unknown hard-attention settings"):
        HardAttentionConfig.from_dict({**config.to_dict(), "glimpse_size": 3})


# -- glimpse sensor ---------------------------------------------------------------------
def test_glimpses_equal_a_hand_crop_with_padding_and_block_means():
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 12, 16, generator=gen)
    # centre at pixel (x, y) = (2, 9): the 4 px box is (0, 7, 4, 4) and lies inside; the
    # 8 px box at scale 2 is (-2, 5, 8, 8), 2 columns left of and 1 row below the image
    centre = torch.tensor([[2 / 16 * 2 - 1, 9 / 12 * 2 - 1]])
    boxes = glimpse_boxes(centre, (12, 16), 4, (1, 2))
    assert boxes.tolist() == [[[0, 7, 4, 4], [-2, 5, 8, 8]]]
    fill = torch.tensor([0.1, 0.2, 0.3])
    glimpses = extract_glimpses(image, centre, 4, (1, 2), fill=fill)
    assert glimpses.shape == (1, 2, 3, 4, 4)
    torch.testing.assert_close(glimpses[0, 0], image[0, :, 7:11, 0:4])
    padded = fill.view(3, 1, 1).expand(3, 20, 24).clone()  # 4 px of fill on every side
    padded[:, 4:16, 4:20] = image[0]
    crop = padded[:, 5 + 4 : 13 + 4, -2 + 4 : 6 + 4]  # (3, 8, 8)
    by_hand = crop.reshape(3, 4, 2, 4, 2).mean(dim=(2, 4))  # mean of each 2 x 2 block
    torch.testing.assert_close(glimpses[0, 1], by_hand)


def test_the_sensor_takes_uint8_and_non_integer_scales():
    image = torch.randint(0, 256, (2, 3, 20, 20), dtype=torch.uint8)
    centres = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    glimpses = extract_glimpses(image, centres, 4, (1, 1.5, 3))
    assert glimpses.shape == (2, 3, 3, 4, 4) and glimpses.dtype == torch.float32
    # scale 1 at the centre: pixels 8..11 exactly, as floats
    torch.testing.assert_close(glimpses[0, 0], image[0, :, 8:12, 8:12].float())
    # scale 1.5 covers 6 px resized to 4 (adaptive average pooling)
    torch.testing.assert_close(
        glimpses[0, 1], F.adaptive_avg_pool2d(image[0, :, 7:13, 7:13].float(), 4)
    )


def test_model_pads_glimpses_with_the_normalised_mean_zero():
    model = tiny_model()
    corner = torch.tensor([[-1.0, -1.0]])
    glimpses = model.sense(tiles(1), corner)  # (1, S, C, g, g)
    # the 4 px box at the top-left corner starts 2 px before the image in x and y
    assert torch.all(glimpses[0, 0, :, :2, :] == 0) and torch.all(glimpses[0, 0, :, :, :2] == 0)
    assert torch.all(glimpses[0, 0, :, 2:, 2:] != 0)


# -- the episode --------------------------------------------------------------------
def test_episode_shapes_for_t_steps_and_s_scales():
    model = tiny_model(glimpses=5, scales=(1, 1.5, 3))
    episode = model(tiles(4))
    assert episode.logits.shape == (4, 5, 4)
    assert episode.locations.shape == episode.means.shape == (4, 5, 2)
    assert episode.log_probs.shape == episode.baselines.shape == (4, 5)
    assert episode.boxes().shape == (4, 5, 3, 4)
    assert episode.boxes(2048).shape == (4, 5, 3, 4)
    assert episode.probabilities.shape == (4, 5, 4) and episode.predictions.shape == (4, 5)
    # the first location is not the policy's: no log-probability, the mean is itself
    assert torch.all(episode.log_probs[:, 0] == 0)
    torch.testing.assert_close(episode.means[:, 0], episode.locations[:, 0])
    assert episode.locations.abs().max() <= 1 and not episode.locations.requires_grad
    assert episode.means.requires_grad and episode.log_probs.requires_grad


def test_boxes_are_the_sensors_boxes_in_tile_pixels():
    model = tiny_model()
    episode = model(tiles(2), sample=False, first=torch.tensor([0.0, 0.0]))
    boxes = episode.boxes()  # (B, T, S, 4)
    # centre of a 32 px tile: 4 px box from 14, 8 px box from 12
    assert boxes[0, 0].tolist() == [[14, 14, 4, 4], [12, 12, 8, 8]]
    torch.testing.assert_close(
        boxes, glimpse_boxes(episode.locations, 32, 4, (1, 2)), rtol=0, atol=0
    )


def test_uint8_channels_last_tiles_give_the_same_episode_as_floats():
    model = tiny_model()
    raw = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    as_float = raw.permute(0, 3, 1, 2).float() / 255
    first = torch.tensor([0.3, -0.2])
    a = model(raw, sample=False, first=first)
    b = model(as_float, sample=False, first=first)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.locations, b.locations)


def test_tiles_of_another_size_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="tile_px"):
        model(tiles(1, size=48))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model(tiles(1), first=torch.tensor([1.5, 0.0]))


def test_inference_is_deterministic_given_the_first_location():
    model = tiny_model()
    x = tiles(3)
    first = torch.tensor([[-0.5, 0.5], [0.0, 0.0], [0.9, -0.9]])
    a = model(x, sample=False, first=first)
    b = model(x, sample=False, first=first, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(a.locations, b.locations, rtol=0, atol=0)
    torch.testing.assert_close(a.locations[:, 1:], a.means[:, 1:].detach())
    # predict: the same run from the centre, last step's probabilities
    centre = model(x, sample=False, first=torch.zeros(2))
    torch.testing.assert_close(model.predict(x), centre.probabilities[:, -1])
    # sampling is reproducible with a generator, and differs from the mean path
    c = model(x, generator=torch.Generator().manual_seed(3))
    d = model(x, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(c.locations, d.locations, rtol=0, atol=0)
    assert not torch.equal(c.locations[:, 1:], c.means[:, 1:].detach())


def test_replaying_the_locations_gives_back_the_log_probabilities():
    # a wide policy, so that some samples are clamped to the border
    model = tiny_model(location_std=2.0, glimpses=4)
    x = tiles(8)
    episode = model(x, generator=torch.Generator().manual_seed(0))
    assert bool((episode.locations.abs() == 1).any())
    replay = model(x, locations=episode.locations)
    torch.testing.assert_close(replay.log_probs, episode.log_probs)
    torch.testing.assert_close(replay.logits, episode.logits)


def test_a_clamped_location_carries_the_mass_beyond_the_border():
    means, std = torch.tensor([0.8, 0.1]), 0.3
    normal = torch.distributions.Normal(means.double(), std)  # float64: no cdf underflow
    at_border = policy_log_prob(torch.tensor([1.0, 0.0]), means, std)
    expected = (
        torch.log(1 - normal.cdf(torch.tensor(1.0)))[0] + normal.log_prob(torch.tensor(0.0))[1]
    )
    torch.testing.assert_close(at_border, expected.float())
    below = policy_log_prob(torch.tensor([-1.0, 0.1]), means, std)
    expected = torch.log(normal.cdf(torch.tensor(-1.0)))[0] + normal.log_prob(means)[1]
    torch.testing.assert_close(below, expected.float())


# -- inhibition of return ---------------------------------------------------------
def _visited(boxes: list[list[int]], context_px: int, tile_px: int) -> torch.Tensor:
    """Context pixels whose centre lies in any of the (x, y, w, h) tile-pixel boxes."""
    mask = torch.zeros(context_px, context_px, dtype=torch.bool)
    step = tile_px / context_px
    for i in range(context_px):
        for j in range(context_px):
            cx, cy = (j + 0.5) * step, (i + 0.5) * step
            mask[i, j] = any(x <= cx < x + w and y <= cy < y + h for x, y, w, h in boxes)
    return mask


def test_inhibition_of_return_blacks_out_each_visited_box_in_the_context():
    model = tiny_model(glimpses=4)
    x = tiles(2)
    seen: list[torch.Tensor] = []
    hook = model.context_net.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    try:
        episode = model(x, sample=False, first=torch.tensor([-0.5, -0.5]))
    finally:
        hook.remove()
    context = model.context_input(x)  # (B, C, 16, 16), never 0 (tiles in [0.6, 1])
    assert len(seen) == 3  # before choosing l_1, l_2 and l_3
    boxes = episode.boxes()[:, :, -1]  # (B, T, 4): the largest-scale boxes
    for step, received in enumerate(seen):
        for b in range(2):
            visited = _visited(boxes[b, : step + 1].tolist(), 16, 32)
            assert visited.any() and not visited.all()
            assert torch.all(received[b][:, visited] == 0)
            torch.testing.assert_close(received[b][:, ~visited], context[b][:, ~visited])


def test_without_inhibition_of_return_the_context_is_seen_once_unchanged():
    model = tiny_model(glimpses=4, inhibition_of_return=False)
    x = tiles(2)
    seen: list[torch.Tensor] = []
    hook = model.context_net.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    try:
        model(x, sample=False, first=torch.tensor([-0.5, -0.5]))
    finally:
        hook.remove()
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], model.context_input(x))


# -- the loss -------------------------------------------------------------------------
def test_discounted_returns():
    rewards = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    expected = torch.tensor([[1.25, 0.5, 1.0], [0.75, 1.5, 1.0]])
    torch.testing.assert_close(discounted_returns(rewards, 0.5), expected)
    torch.testing.assert_close(discounted_returns(rewards, 1.0)[:, 0], torch.tensor([2.0, 2.0]))


def test_loss_terms_follow_their_definitions():
    config = tiny_config(overlap_weight=0.3, ordinal_weight=0.7, discount=0.9)
    model = HardAttention(config)
    episode = model(tiles(4), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3])
    loss = hard_attention_loss(episode, labels, config)
    rewards = (episode.predictions == labels[:, None]).float()
    returns = discounted_returns(rewards, 0.9)
    advantage = (returns - episode.baselines).detach()
    reinforce = -(episode.log_probs * advantage).sum(1).mean()
    torch.testing.assert_close(loss.reinforce, reinforce)
    torch.testing.assert_close(loss.baseline, ((episode.baselines - returns) ** 2).mean())
    torch.testing.assert_close(loss.classification, F.cross_entropy(episode.logits[:, -1], labels))
    p = episode.probabilities[:, -1]
    expected_score = (p * torch.arange(4.0)).sum(-1)
    torch.testing.assert_close(loss.ordinal, (expected_score - labels).abs().mean())
    total = (
        loss.classification + loss.reinforce + loss.baseline + 0.3 * loss.overlap
    ) + 0.7 * loss.ordinal
    torch.testing.assert_close(loss.total, total)
    assert loss.accuracy == rewards[:, -1].mean()
    # every step supervised: the mean of the per-step cross-entropies
    every = hard_attention_loss(episode, labels, tiny_config(supervise_all_steps=True))
    per_step = [F.cross_entropy(episode.logits[:, t], labels) for t in range(3)]
    torch.testing.assert_close(every.classification, torch.stack(per_step).mean())


def _step_and_replay(sign: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log π of a sampled path before and after one SGD step on the REINFORCE term whose
    advantages all have the given sign (set through the baseline)."""
    config = tiny_config(glimpses=4, location_std=0.3)
    torch.manual_seed(0)
    model = HardAttention(config)
    with torch.no_grad():
        model.baseline_net.weight.zero_()
        model.baseline_net.bias.fill_(-10.0 * sign)  # returns are in [0, 4]
    x = tiles(8)
    episode = model(x, generator=torch.Generator().manual_seed(1))
    loss = hard_attention_loss(episode, torch.zeros(8, dtype=torch.long), config)
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-4)
    loss.reinforce.backward()
    optimiser.step()
    with torch.no_grad():
        after = model(x, locations=episode.locations).log_probs
    return episode.log_probs.detach(), after


def test_reinforce_makes_positively_rewarded_locations_more_likely():
    before, after = _step_and_replay(+1.0)
    assert after[:, 1:].sum() > before[:, 1:].sum()
    before, after = _step_and_replay(-1.0)
    assert after[:, 1:].sum() < before[:, 1:].sum()


def test_the_policy_gradient_reaches_the_location_and_context_networks_only():
    model = tiny_model()
    episode = model(tiles(4), generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(4, dtype=torch.long)
    (hard_attention_loss(episode, labels, model.config).reinforce + 0.0).backward()
    assert model.location_net.weight.grad.abs().sum() > 0
    assert model.context_net[-2].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.core.parameters())
    assert all(p.grad is None for p in model.glimpse_net.parameters())
    # as Mnih et al.: the policy gradient also trains the core and the glimpse network
    model = tiny_model(policy_trains_core=True)
    episode = model(tiles(4), generator=torch.Generator().manual_seed(0))
    hard_attention_loss(episode, labels, model.config).reinforce.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.core.parameters())


def test_the_baseline_learns_the_returns_without_steering_the_core():
    config = tiny_config(glimpses=4)
    torch.manual_seed(0)
    model = HardAttention(config)
    x, labels = tiles(8), torch.tensor([0, 1, 2, 3] * 2)
    path = model(x, generator=torch.Generator().manual_seed(1)).locations
    optimiser = torch.optim.Adam(model.baseline_net.parameters(), lr=0.05)
    losses = []
    for _ in range(40):
        episode = model(x, locations=path)
        loss = hard_attention_loss(episode, labels, config)
        optimiser.zero_grad()
        loss.baseline.backward()
        optimiser.step()
        losses.append(float(loss.baseline.detach()))
        assert all(p.grad is None for p in model.core.parameters())
    rewards = (episode.predictions == labels[:, None]).float()
    returns = discounted_returns(rewards, 1.0)
    assert returns.std() > 0  # something to learn
    # better than the untrained baseline, and at least as good as the best constant
    assert losses[-1] < 0.9 * losses[0]
    assert losses[-1] <= float(returns.var(unbiased=False))


def test_overlap_is_one_for_identical_boxes_and_zero_for_disjoint_ones():
    # 8 px boxes on a 32 px tile: 0.5 wide in [-1, 1] coordinates
    same = torch.tensor([[[0.2, -0.3], [0.2, -0.3], [0.2, -0.3]]])
    torch.testing.assert_close(box_overlap(same, 8, 32), torch.tensor([1.0]))
    apart = torch.tensor([[[-0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]]])
    torch.testing.assert_close(box_overlap(apart, 8, 32), torch.tensor([0.0]))
    # shifted by half a box in x: half the area; the 3 pairs of 3 boxes are averaged
    half = torch.tensor([[[0.0, 0.0], [0.25, 0.0], [0.9, 0.9]]])
    torch.testing.assert_close(box_overlap(half, 8, 32), torch.tensor([0.5 / 3]))
    assert box_overlap(torch.zeros(2, 1, 2), 8, 32).tolist() == [0.0, 0.0]
    # the loss uses the largest scale (8 px of the 4 px glimpses at scales 1 and 2)
    logits = torch.zeros(1, 3, 4)
    loss = hard_attention_loss(episode_of(logits, same), torch.tensor([0]), tiny_config())
    torch.testing.assert_close(loss.overlap, torch.tensor(1.0))


def test_overlap_gradient_pushes_overlapping_means_apart():
    means = torch.tensor([[[0.0, 0.0], [0.1, 0.05]]], requires_grad=True)
    overlap = box_overlap(means, 8, 32)
    torch.testing.assert_close(overlap, torch.tensor([(0.4 * 0.45) / 0.25]))
    overlap.sum().backward()
    grad = means.grad[0]
    away = means.detach()[0, 1] - means.detach()[0, 0]
    # gradient descent moves each mean away from the other
    assert float(-grad[1] @ away) > 0 and float(-grad[0] @ -away) > 0


def test_overlap_is_computed_on_the_policy_means_so_it_trains_the_location_network():
    model = tiny_model()
    episode = model(tiles(4), generator=torch.Generator().manual_seed(0))
    loss = hard_attention_loss(episode, torch.zeros(4, dtype=torch.long), model.config)
    assert loss.overlap > 0
    loss.overlap.backward()
    assert model.location_net.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("risk_order", [None, (3, 2, 1, 0)])
def test_ordinal_term_moves_the_expected_score_toward_the_label(risk_order):
    config = tiny_config(risk_order=risk_order, glimpses=1)
    rank = torch.tensor(config.risk).argsort().float()  # rank[k]: the score of class k
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0]]], requires_grad=True)
    label = torch.tensor([2])
    episode = episode_of(logits, torch.zeros(1, 1, 2))

    def expected() -> float:
        return float((torch.softmax(logits.detach()[0, -1], -1) * rank).sum())

    loss = hard_attention_loss(episode, label, config)
    torch.testing.assert_close(loss.ordinal, torch.tensor(abs(expected() - float(rank[2]))))
    before = loss.ordinal.item()
    loss.ordinal.backward()
    with torch.no_grad():
        logits -= 0.5 * logits.grad
    after = abs(expected() - float(rank[2]))
    assert after < before


# -- checkpoints ------------------------------------------------------------------------
def test_checkpoint_round_trip(tmp_path):
    model = tiny_model(risk_order=(0, 2, 1, 3))
    path = save_checkpoint(
        tmp_path / "hard", MODEL_KIND, model.config.to_dict(), model.state_dict()
    )
    loaded, _ = load_model(path)
    assert isinstance(loaded, HardAttention) and loaded.config == model.config
    torch.testing.assert_close(loaded.predict(tiles(2)), model.predict(tiles(2)))


# -- learning -----------------------------------------------------------------------
def coloured_squares(n: int, seed: int, size: int = 32, square: int = 4):
    """Dim noise with one bright square at a random place; the class is its colour."""
    gen = torch.Generator().manual_seed(seed)
    images = 0.1 * torch.rand(n, 3, size, size, generator=gen)
    labels = torch.randint(0, 3, (n,), generator=gen)
    corners = torch.randint(0, size - square + 1, (n, 2), generator=gen)
    for image, label, (x, y) in zip(images, labels.tolist(), corners.tolist(), strict=True):
        image[label, y : y + square, x : x + square] = 1.0
    return images, labels


@pytest.mark.slow
def test_learns_where_to_look_on_a_small_task():
    # 3 glimpses of 8 px (and 16 px at scale 2) on 32 px images: the classifier sees
    # only the glimpses, so beating random glimpses needs a policy that finds the square
    # in the context image. L_bb is off: its box is a quarter of this tile (the paper's
    # is 1/64), which would forbid looking at the square twice. A wide policy (σ = 0.5)
    # explores enough to find the square in 600 steps: seeds 0-9 all reached 0.93-1.0
    # (random glimpses: 0.74-0.77); with σ = 0.3, 2 of 10 seeds stayed below 0.9.
    config = HardAttentionConfig(
        classes=("red", "green", "blue"),
        glimpses=3,
        glimpse_px=8,
        tile_px=32,
        context_px=16,
        feature=64,
        hidden=(64, 32),
        glimpse_channels=(16, 32),
        context_channels=(16, 32),
        location_std=0.5,
        overlap_weight=0.0,
        mean=(0.2, 0.2, 0.2),
        std=(0.3, 0.3, 0.3),
    )
    torch.manual_seed(0)
    model = HardAttention(config)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    images, labels = coloured_squares(4096, seed=1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(600):
        pick = torch.randint(0, len(images), (32,), generator=gen)
        loss = hard_attention_loss(model(images[pick], generator=gen), labels[pick], config)
        optimiser.zero_grad()
        loss.total.backward()
        optimiser.step()

    test_images, test_labels = coloured_squares(512, seed=1000)
    learned = (model.predict(test_images).argmax(-1) == test_labels).float().mean()
    random_path = torch.rand(512, 3, 2, generator=torch.Generator().manual_seed(5)) * 2 - 1
    random_path[:, 0] = 0.0  # from the centre, as predict
    with torch.no_grad():
        random_logits = model(test_images, locations=random_path).logits[:, -1]
    at_random = (random_logits.argmax(-1) == test_labels).float().mean()
    assert learned >= 0.9, f"accuracy {learned:.3f} (chance 0.33)"
    assert learned >= at_random + 0.1, f"{learned:.3f} vs random glimpses {at_random:.3f}"
