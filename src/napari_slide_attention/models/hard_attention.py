"""Hard attention on a tile (Raza et al., dual attention, sections III-D and III-E).

A recurrent attention model in the manner of Mnih et al. (2014) looks at a tile through
T glimpses. At step t a glimpse sensor cuts S squares around the location l_t, one per
scale (the paper: 128 px at 40x and at 20x, i.e. 128 and 256 tile pixels, the second
resized to 128); a CNN f_g turns the stacked squares into v_g, a linear layer turns l_t
into v_l, and v_t = v_g ⊙ v_l (Hadamard, as the paper) drives a stacked LSTM core. After
each glimpse a classifier reads the core output (per-step class scores, hence per-step
rewards), and the location network f_l reads the core output ⊙ the context features
f_c(i_d) of the downscaled tile i_d to give the mean of a Gaussian policy over l_{t+1}.
Inhibition of return blacks out the area of every glimpse taken so far in i_d before the
context CNN sees it again. The first location is random (the paper) unless given.

Training (``hard_attention_loss``): cross-entropy on the class scores, REINFORCE on the
locations with per-step rewards r_t = 1[prediction_t == label] and a learned baseline,
the overlap term L_bb over the C(T, 2) pairs of glimpse boxes and the ordinal term L_s on
the expected score; L_HA = L_θ + δ(L_bb + L_s).

Where the paper is silent, the choices are ours and are written where they are made:
coordinates and boxes (``glimpse_boxes``), padding and blacking out in normalised
pixels (``HardAttention``), the censored Gaussian policy (``policy_log_prob``), the
episode's t = 0 entries (``GlimpseEpisode``), where the policy's gradient goes
(``HardAttentionConfig.policy_trains_core``) and the loss terms
(``hard_attention_loss``).

Coordinates: a location is the (x, y) glimpse centre in [-1, 1] over the tile, -1 being
the left (top) edge of the tile and 1 its right (bottom) edge, as ``F.grid_sample`` with
``align_corners=False``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .tile_network import MAX_WIDTH, ModelConfig, check_range

__all__ = [
    "MODEL_KIND",
    "GlimpseEpisode",
    "HardAttention",
    "HardAttentionConfig",
    "HardAttentionLoss",
    "box_overlap",
    "discounted_returns",
    "extract_glimpses",
    "glimpse_boxes",
    "hard_attention_loss",
    "policy_log_prob",
    "scale_px",
]

MODEL_KIND = "hard-attention"
# The largest tile the model takes (the paper: 2048 px at 40x).
MAX_TILE_PX = 8192
_CONVERT_FLOATS = 1 << 26  # pixels converted to float at a time for i_d (256 MB)


@dataclass
class HardAttentionConfig(ModelConfig):
    """Sizes and settings of a hard-attention tile classifier (saved with every checkpoint).

    The defaults are the paper's (IV-A2) where it gives a value; the rest are ours.

    Attributes:
        classes: class names, in the order of the model's outputs.
        risk_order: class indices from lowest to highest score (HER2 0 .. 3+); the rank of
            a class in it is the class's score for L_s. Empty (or None) = the order of
            ``classes``.
        glimpses: T, glimpses per tile (6).
        glimpse_px: g, edge of every glimpse square fed to the glimpse CNN (128).
        scales: magnification factors relative to the tile's pixels, finest first: scale
            s covers s·g tile pixels resized to g ((1, 2): 40x and 20x on 40x tiles).
        tile_px: edge of the square tiles the model takes (2048 at 40x).
        in_channels: image channels (3, RGB).
        context_px: edge of the downscaled tile i_d the context CNN sees (ours: 128).
        feature: size of v_g, v_l and v_t (256).
        hidden: hidden sizes of the stacked LSTM core ((256, 128)); the last one is the
            size of the core output and of the context features.
        glimpse_channels: widths of the glimpse CNN's 3x3 stride-2 convolutions (ours).
        glimpse_pool: the glimpse CNN's last feature map is average-pooled to this many
            cells per side before its linear layer (1 = global pooling).
        context_channels: widths of the context CNN's 3x3 stride-2 convolutions (ours).
        context_pool: as ``glimpse_pool`` for the context CNN; more than 1 keeps coarse
            positions, which the location network needs to see where i_d is blacked out.
        location_std: standard deviation of the Gaussian location policy in the [-1, 1]
            coordinates (ours: 0.15, i.e. 7.5 % of the tile edge).
        inhibition_of_return: black out visited areas in i_d (the paper: on).
        overlap_weight: δ for L_bb (the paper: 1).
        ordinal_weight: δ for L_s (the paper: 1).
        discount: weighing factor of later rewards in the returns (the paper: 1).
        supervise_all_steps: cross-entropy and L_s on every step's class scores (mean over
            steps) instead of the last step's only (the paper: the last, Y_T).
        policy_trains_core: let the policy's gradients (REINFORCE and L_bb) reach the
            core, glimpse CNN and location embedding through the location network's
            input, as Mnih et al.; False (ours, as common RAM code) keeps them to the
            location and context networks, and the classification loss alone trains the
            rest. On our small learning task letting them through saturated the policy's
            tanh and collapsed the classifier.
        mean, std: per-channel normalisation of pixels scaled to [0, 1].
    """

    classes: tuple[str, ...]
    risk_order: tuple[int, ...] | None = ()
    glimpses: int = 6
    glimpse_px: int = 128
    scales: tuple[float, ...] = (1.0, 2.0)
    tile_px: int = 2048
    in_channels: int = 3
    context_px: int = 128
    feature: int = 256
    hidden: tuple[int, ...] = (256, 128)
    glimpse_channels: tuple[int, ...] = (32, 64, 128, 256)
    glimpse_pool: int = 1
    context_channels: tuple[int, ...] = (16, 32, 64)
    context_pool: int = 4
    location_std: float = 0.15
    inhibition_of_return: bool = True
    overlap_weight: float = 1.0
    ordinal_weight: float = 1.0
    discount: float = 1.0
    supervise_all_steps: bool = False
    policy_trains_core: bool = False
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)
    kind: str = field(default=MODEL_KIND, init=False)

    def __post_init__(self) -> None:
        self._check_classes()  # and every field's type
        self.scales = tuple(float(s) for s in self.scales)
        self.hidden = tuple(int(h) for h in self.hidden)
        self.glimpse_channels = tuple(int(c) for c in self.glimpse_channels)
        self.context_channels = tuple(int(c) for c in self.context_channels)
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        if self.glimpses < 1:
            raise ValueError(f"glimpses must be at least 1, got {self.glimpses}")
        if self.glimpse_px < 1 or self.tile_px < self.glimpse_px:
            raise ValueError(
                f"glimpse_px must be at least 1 and at most tile_px ({self.tile_px}), got "
                f"{self.glimpse_px}"
            )
        if not self.scales or any(s < 1 for s in self.scales):
            raise ValueError(f"scales must be factors >= 1, got {list(self.scales)}")
        if any(b <= a for a, b in itertools.pairwise(self.scales)):
            raise ValueError(f"scales must increase strictly (finest first), got {self.scales}")
        if not 1 <= self.context_px <= self.tile_px:
            raise ValueError(f"context_px must be in 1..tile_px, got {self.context_px}")
        if self.in_channels < 1 or self.feature < 1:
            raise ValueError("in_channels and feature must be at least 1")
        for name in ("hidden", "glimpse_channels", "context_channels"):
            sizes = getattr(self, name)
            if not sizes or min(sizes) < 1:
                raise ValueError(f"{name} needs at least one positive size, got {list(sizes)}")
        if self.glimpse_pool < 1 or self.context_pool < 1:
            raise ValueError("glimpse_pool and context_pool must be at least 1")
        if not (self.location_std > 0 and math.isfinite(self.location_std)):
            raise ValueError(f"location_std must be positive, got {self.location_std}")
        if self.overlap_weight < 0 or self.ordinal_weight < 0:
            raise ValueError("overlap_weight and ordinal_weight must not be negative")
        if not 0 <= self.discount <= 1:
            raise ValueError(f"discount must be in [0, 1], got {self.discount}")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(
                f"mean and std need one value per channel ({self.in_channels}), got "
                f"{len(self.mean)} and {len(self.std)}"
            )
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {list(self.std)}")
        check_range("glimpses", self.glimpses, 1, 64)
        check_range("tile_px", self.tile_px, 1, MAX_TILE_PX)
        check_range("in_channels", self.in_channels, 1, 16)
        check_range("feature", self.feature, 1, MAX_WIDTH)
        check_range("glimpse_pool", self.glimpse_pool, 1, 64)
        check_range("context_pool", self.context_pool, 1, 64)
        if len(self.scales) > 8:
            raise ValueError(f"scales must have at most 8 values, got {len(self.scales)}")
        for scale in self.scales:
            check_range("scales", scale, 1, 64)
        for name in ("hidden", "glimpse_channels", "context_channels"):
            sizes = getattr(self, name)
            if len(sizes) > 16:
                raise ValueError(f"{name} must have at most 16 sizes, got {len(sizes)}")
            for size in sizes:
                check_range(name, size, 1, MAX_WIDTH)

    @property
    def box_px(self) -> int:
        """Edge in tile pixels of the largest-scale glimpse (the box of L_bb and IOR)."""
        return scale_px(self.glimpse_px, self.scales[-1])


def scale_px(glimpse_px: int, scale: float) -> int:
    """Tile pixels covered by a glimpse of ``glimpse_px`` at ``scale`` (rounded)."""
    return max(1, round(glimpse_px * scale))


# -- glimpse sensor ---------------------------------------------------------------------
def glimpse_boxes(
    centres: torch.Tensor,
    image_size: int | tuple[int, int],
    glimpse_px: int,
    scales: Sequence[float],
) -> torch.Tensor:
    """(..., S, 4) pixel boxes (x, y, w, h) of the glimpses around normalised centres.

    The box at scale s is the s·g pixel square whose centre is nearest the location: its
    left edge is the centre's pixel position minus half the side, rounded half up. A box
    can reach past the image; the sensor pads there.

    Args:
        centres: (..., 2) glimpse centres (x, y) in [-1, 1].
        image_size: the image's (height, width) in pixels, or one edge for a square.
        glimpse_px: g.
        scales: the magnification factors.
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    sides = torch.tensor([scale_px(glimpse_px, s) for s in scales], device=centres.device)
    size = torch.tensor([width, height], dtype=centres.dtype, device=centres.device)
    pixel = (centres.detach() + 1) / 2 * size  # (..., 2)
    corner = torch.floor(pixel[..., None, :] - sides[:, None] / 2 + 0.5).long()  # (..., S, 2)
    wh = sides[:, None].expand(-1, 2).expand_as(corner)  # (..., S, 2)
    return torch.cat([corner, wh], dim=-1)  # (..., S, 4)


def extract_glimpses(
    images: torch.Tensor,
    centres: torch.Tensor,
    glimpse_px: int,
    scales: Sequence[float],
    fill: float | Sequence[float] | torch.Tensor = 0.0,
) -> torch.Tensor:
    """(B, S, C, g, g) float glimpses: per scale, the box of ``glimpse_boxes`` resized to g.

    Each box is cut out exactly (pixels outside the image take ``fill``) and
    average-pooled to g x g: for an integer scale s, each output pixel is the exact mean
    of an s x s block; otherwise ``adaptive_avg_pool2d``'s windows. The input keeps its
    dtype until the crop, so uint8 tiles are never converted whole.

    Args:
        images: (B, C, H, W) images of any dtype (values are not rescaled).
        centres: (B, 2) glimpse centres (x, y) in [-1, 1].
        glimpse_px: g, the output edge.
        scales: the magnification factors (each s covers round(s·g) pixels).
        fill: the value of pixels outside the image, one for all channels or one per
            channel, in the units of ``images``.
    """
    batch, _, height, width = images.shape
    device = images.device
    fill = torch.as_tensor(fill, dtype=torch.float32, device=device).reshape(-1)  # (1 or C,)
    boxes = glimpse_boxes(centres, (height, width), glimpse_px, scales)  # (B, S, 4)
    pixels = images.permute(0, 2, 3, 1)  # (B, H, W, C), a view
    index = torch.arange(batch, device=device)[:, None, None]  # (B, 1, 1)
    out = []
    for k, scale in enumerate(scales):
        side = scale_px(glimpse_px, scale)
        step = torch.arange(side, device=device)
        cols = boxes[:, k, 0, None] + step  # (B, side)
        rows = boxes[:, k, 1, None] + step  # (B, side)
        inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[
            :, None, :
        ]  # (B, side, side)
        crop = pixels[
            index, rows.clamp(0, height - 1)[:, :, None], cols.clamp(0, width - 1)[:, None, :]
        ].float()  # (B, side, side, C)
        crop = torch.where(inside[..., None], crop, fill)
        crop = crop.permute(0, 3, 1, 2)  # (B, C, side, side)
        if side == glimpse_px:
            out.append(crop)
        elif side % glimpse_px == 0:
            out.append(F.avg_pool2d(crop, side // glimpse_px))  # (B, C, g, g)
        else:
            out.append(F.adaptive_avg_pool2d(crop, glimpse_px))  # (B, C, g, g)
    return torch.stack(out, dim=1)  # (B, S, C, g, g)


def policy_log_prob(locations: torch.Tensor, means: torch.Tensor, std: float) -> torch.Tensor:
    """(...) log-likelihood of locations under the clamped Gaussian policy (x and y summed).

    A sample l = μ + σε is clamped to [-1, 1] before the glimpse is taken, so a location
    on the border carries the probability mass beyond it: log Φ((μ - 1)/σ) at 1 and
    log Φ((-1 - μ)/σ) at -1; inside, the Gaussian density. This is the exact likelihood
    of the location the glimpse used, so replaying an episode's locations gives back its
    log-probabilities.

    Args:
        locations: (..., 2) locations in [-1, 1].
        means: (..., 2) policy means.
        std: the policy's standard deviation.
    """
    density = -0.5 * ((locations - means) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)
    above = torch.special.log_ndtr((means - 1) / std)
    below = torch.special.log_ndtr((-1 - means) / std)
    log_p = torch.where(locations >= 1, above, torch.where(locations <= -1, below, density))
    return log_p.sum(-1)


# -- the model ------------------------------------------------------------------------
@dataclass(frozen=True)
class GlimpseEpisode:
    """One run of T glimpses on a batch of tiles.

    Step t takes the glimpse at ``locations[:, t]``, then gives ``logits[:, t]``. The
    location of step t >= 1 was drawn from the policy N(``means[:, t]``, σ²) computed
    after step t - 1 and clamped to [-1, 1] (or is the mean itself, without sampling);
    the first location is not the policy's (random, or given), so ``means[:, 0]`` holds
    the first location itself and ``log_probs[:, 0]`` is 0.

    Attributes:
        logits: (B, T, K) class scores after each glimpse.
        locations: (B, T, 2) glimpse centres (x, y) in [-1, 1] (no gradient).
        means: (B, T, 2) policy means (differentiable; t = 0: the first location).
        log_probs: (B, T) log π of each location (``policy_log_prob``; 0 at t = 0).
        baselines: (B, T) the baseline's estimate of the return from step t on, made
            before l_t was chosen (from the previous core output, detached; at t = 0
            from the empty state, i.e. the baseline's bias).
        glimpse_px: g.
        scales: the magnification factors.
        tile_px: the tile edge in pixels.
    """

    logits: torch.Tensor
    locations: torch.Tensor
    means: torch.Tensor
    log_probs: torch.Tensor
    baselines: torch.Tensor
    glimpse_px: int
    scales: tuple[float, ...]
    tile_px: int

    @property
    def probabilities(self) -> torch.Tensor:
        """(B, T, K) class probabilities after each glimpse."""
        return torch.softmax(self.logits, dim=-1)

    @property
    def predictions(self) -> torch.Tensor:
        """(B, T) predicted class after each glimpse."""
        return self.logits.argmax(dim=-1)

    def boxes(self, tile_px: int | None = None) -> torch.Tensor:
        """(B, T, S, 4) glimpse boxes (x, y, w, h) in tile pixels, finest scale first.

        Args:
            tile_px: the tile edge to map to (default: the episode's tile).
        """
        size = self.tile_px if tile_px is None else int(tile_px)
        return glimpse_boxes(self.locations, size, self.glimpse_px, self.scales)


def _conv_stack(in_channels: int, widths: Sequence[int], pool: int) -> nn.Sequential:
    """3x3 stride-2 convolutions with ReLU, then average pooling to pool x pool, flattened."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
        in_channels = width
    layers += [nn.AdaptiveAvgPool2d(pool), nn.Flatten()]
    return nn.Sequential(*layers)


class HardAttention(nn.Module):
    """Raza et al.'s hard-attention tile classifier (a recurrent attention model).

    Parts (for hooks and parameter groups): ``glimpse_net`` f_g, ``where_net`` the
    location embedding, ``core`` the LSTM cells, ``context_net`` f_c, ``location_net``
    f_l, ``baseline_net`` and ``classifier``. There is no batch normalisation and no
    dropout, so train and eval modes compute the same thing.

    Args:
        config: sizes and settings.
    """

    def __init__(self, config: HardAttentionConfig):
        super().__init__()
        self.config = config
        c = config
        channels = c.in_channels
        self.register_buffer("mean", torch.tensor(c.mean).view(1, channels, 1, 1))
        self.register_buffer("std", torch.tensor(c.std).view(1, channels, 1, 1))
        core_size = c.hidden[-1]
        # f_g: the S glimpses stacked as channels -> v_g
        self.glimpse_net = nn.Sequential(
            _conv_stack(len(c.scales) * channels, c.glimpse_channels, c.glimpse_pool),
            nn.Linear(c.glimpse_channels[-1] * c.glimpse_pool**2, c.feature),
            nn.ReLU(inplace=True),
        )
        # f_l0: "a linear layer" on l_t -> v_l
        self.where_net = nn.Linear(2, c.feature)
        sizes = (c.feature, *c.hidden)
        self.core = nn.ModuleList(nn.LSTMCell(a, b) for a, b in itertools.pairwise(sizes))
        # f_c: the (blacked-out) downscaled tile -> context features
        self.context_net = nn.Sequential(
            _conv_stack(channels, c.context_channels, c.context_pool),
            nn.Linear(c.context_channels[-1] * c.context_pool**2, core_size),
            nn.ReLU(inplace=True),
        )
        self.location_net = nn.Linear(core_size, 2)  # f_l: -> tanh -> μ_{t+1}
        self.baseline_net = nn.Linear(core_size, 1)
        self.classifier = nn.Linear(core_size, len(c.classes))

    def set_normalisation(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Use these per-channel statistics (pixels in [0, 1]) from now on."""
        self.config.mean = tuple(float(v) for v in mean)
        self.config.std = tuple(float(v) for v in std)
        shape = self.mean.shape
        self.mean.copy_(torch.tensor(self.config.mean).view(shape))
        self.std.copy_(torch.tensor(self.config.std).view(shape))

    # -- inputs ----------------------------------------------------------------------
    def _channels_first(self, tiles: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(B, C, H, W) view of the tiles and the value of white (255 for uint8, else 1)."""
        c = self.config
        if tiles.ndim != 4:
            raise ValueError(f"tiles must be a (B, C, H, W) batch, got shape {tuple(tiles.shape)}")
        white = 1.0
        if tiles.dtype == torch.uint8:
            white = 255.0
            if tiles.shape[-1] == c.in_channels and tiles.shape[1] != c.in_channels:
                tiles = tiles.permute(0, 3, 1, 2)  # (B, C, H, W), a view
        elif not tiles.is_floating_point():
            raise ValueError(f"tiles must be uint8 or float in [0, 1], got {tiles.dtype}")
        if tuple(tiles.shape[1:]) != (c.in_channels, c.tile_px, c.tile_px):
            raise ValueError(
                f"tiles must be {c.in_channels} x {c.tile_px} x {c.tile_px} (the config's "
                f"channels and tile_px), got {tuple(tiles.shape[1:])}"
            )
        return tiles, white

    def _normalise(self, pixels: torch.Tensor, white: float) -> torch.Tensor:
        return (pixels / white - self.mean) / self.std

    def context_input(self, tiles: torch.Tensor) -> torch.Tensor:
        """(B, C, p, p) the normalised downscaled tile i_d (area averaging), p = context_px."""
        tiles, white = self._channels_first(tiles)
        size = self.config.context_px
        if tiles.is_floating_point():
            small = F.interpolate(tiles, size=size, mode="area")
        else:
            # a few tiles at a time: a float copy of 40 uint8 tiles of 2048 px is 2 GB
            per_chunk = max(1, _CONVERT_FLOATS // tiles[0].numel())
            small = torch.cat(
                [
                    F.interpolate(chunk.float(), size=size, mode="area")
                    for chunk in tiles.split(per_chunk)
                ]
            )
        return self._normalise(small, white)

    def sense(self, tiles: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
        """(B, S, C, g, g) normalised glimpses at the locations (the padding is 0).

        Padding outside the tile is the normalisation mean, i.e. exactly 0 after
        normalisation: no signal, rather than black, which in histology means something.

        Args:
            tiles: (B, H, W, C) uint8 or (B, C, H, W) uint8 or float in [0, 1].
            locations: (B, 2) centres (x, y) in [-1, 1].
        """
        c = self.config
        tiles, white = self._channels_first(tiles)
        fill = self.mean.flatten() * white
        raw = extract_glimpses(tiles, locations, c.glimpse_px, c.scales, fill)
        return (raw / white - self.mean[:, None]) / self.std[:, None]

    def _black_out(self, context: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
        """i_d with the largest-scale glimpse box around each location set to 0.

        A context pixel is blacked out when its centre, in tile pixels, falls in the box.
        0 is the normalised mean (as the sensor's padding).
        """
        c = self.config
        box = glimpse_boxes(locations, c.tile_px, c.glimpse_px, c.scales[-1:])[:, 0]  # (B, 4)
        box = box.to(context.dtype)
        step = c.tile_px / c.context_px
        centres = (torch.arange(c.context_px, device=context.device) + 0.5) * step  # (p,)
        in_x = (centres >= box[:, 0, None]) & (centres < box[:, 0, None] + box[:, 2, None])
        in_y = (centres >= box[:, 1, None]) & (centres < box[:, 1, None] + box[:, 3, None])
        visited = in_y[:, :, None] & in_x[:, None, :]  # (B, p, p)
        return context.masked_fill(visited[:, None], 0.0)

    # -- the episode -----------------------------------------------------------------
    def forward(
        self,
        tiles: torch.Tensor,
        *,
        sample: bool = True,
        first: torch.Tensor | None = None,
        locations: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> GlimpseEpisode:
        """Run the T-glimpse episode on a batch of tiles.

        Args:
            tiles: (B, H, W, C) uint8, or (B, C, H, W) uint8 or float in [0, 1]; H = W =
                tile_px.
            sample: draw each location from the policy (training); False = take the
                policy's mean (inference).
            first: (B, 2) or (2,) first location in [-1, 1]; None = uniform at random
                (the paper). Pass ``torch.zeros(2)`` (the centre) for deterministic
                inference.
            locations: (B, T, 2) locations to replay instead of choosing them (``first``
                and ``sample`` are then ignored); the episode's log-probabilities are
                those of these locations under the current policy.
            generator: random numbers for the first location and the policy's samples.
        """
        c = self.config
        pixels, _ = self._channels_first(tiles)
        batch, device = pixels.shape[0], pixels.device
        n_steps = c.glimpses
        if locations is not None:
            if tuple(locations.shape) != (batch, n_steps, 2):
                raise ValueError(
                    f"locations to replay must be ({batch}, {n_steps}, 2), got "
                    f"{tuple(locations.shape)}"
                )
            locations = locations.detach().to(device=device, dtype=torch.float32)
            if not bool(((locations >= -1) & (locations <= 1)).all()):
                raise ValueError("locations to replay must lie in [-1, 1]")
            start = locations[:, 0]
        elif first is not None:
            start = first.to(device=device, dtype=torch.float32).expand(batch, 2)
        else:
            start = torch.rand(batch, 2, generator=generator, device=device) * 2 - 1
        if not bool(((start >= -1) & (start <= 1)).all()):
            raise ValueError("the first location must lie in [-1, 1]")

        context = self.context_input(tiles)  # (B, C, p, p)
        context_features = None
        zeros = [pixels.new_zeros(batch, h, dtype=torch.float32) for h in c.hidden]
        state = [(z, z) for z in zeros]
        core_out = zeros[-1]  # (B, hidden[-1]): nothing seen yet
        logits, where, means, log_probs, baselines = [], [], [], [], []
        for t in range(n_steps):
            if t == 0:
                location, mean = start, start
                log_prob = start.new_zeros(batch)
            else:
                if context_features is None or c.inhibition_of_return:
                    context_features = self.context_net(context)  # (B, hidden[-1])
                where_from = core_out if c.policy_trains_core else core_out.detach()
                mean = torch.tanh(self.location_net(where_from * context_features))  # (B, 2)
                if locations is not None:
                    location = locations[:, t]
                elif sample:
                    noise = torch.randn(batch, 2, generator=generator, device=device)
                    location = (mean.detach() + c.location_std * noise).clamp(-1, 1)
                else:
                    location = mean.detach()
                log_prob = policy_log_prob(location, mean, c.location_std)  # (B,)
            # the baseline sees the state before l_t is chosen, without steering it
            baselines.append(self.baseline_net(core_out.detach())[:, 0])
            glimpse = self.sense(tiles, location)  # (B, S, C, g, g)
            v_g = self.glimpse_net(glimpse.flatten(1, 2))  # (B, feature)
            v_l = self.where_net(location)  # (B, feature)
            x = v_g * v_l  # (B, feature), v_t
            new_state = []
            for cell, (h, cs) in zip(self.core, state, strict=True):
                h, cs = cell(x, (h, cs))
                new_state.append((h, cs))
                x = h
            state, core_out = new_state, x
            logits.append(self.classifier(core_out))  # (B, K)
            where.append(location)
            means.append(mean)
            log_probs.append(log_prob)
            if c.inhibition_of_return and t < n_steps - 1:
                context = self._black_out(context, location)
        return GlimpseEpisode(
            logits=torch.stack(logits, dim=1),  # (B, T, K)
            locations=torch.stack(where, dim=1).detach(),  # (B, T, 2)
            means=torch.stack(means, dim=1),  # (B, T, 2)
            log_probs=torch.stack(log_probs, dim=1),  # (B, T)
            baselines=torch.stack(baselines, dim=1),  # (B, T)
            glimpse_px=c.glimpse_px,
            scales=c.scales,
            tile_px=c.tile_px,
        )

    @torch.no_grad()
    def predict(self, tiles: torch.Tensor, *, first: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K) class probabilities after the last glimpse, deterministically.

        Follows the policy's mean from ``first`` (default: the tile centre).

        Args:
            tiles: as ``forward``.
            first: (B, 2) or (2,) first location in [-1, 1].
        """
        if first is None:
            first = torch.zeros(2)
        episode = self(tiles, sample=False, first=first)
        return torch.softmax(episode.logits[:, -1], dim=-1)


# -- the loss -------------------------------------------------------------------------
@dataclass(frozen=True)
class HardAttentionLoss:
    """The terms of L_HA = L_θ + δ_bb·L_bb + δ_s·L_s for one batch (means over tiles).

    Attributes:
        total: what to back-propagate.
        classification: cross-entropy of the class scores (part of L_θ).
        reinforce: the policy-gradient surrogate -Σ_t log π(l_t)·(R_t - b_t) (part of L_θ).
        baseline: mean squared error of the baselines against the returns (part of L_θ).
        overlap: L_bb, the mean overlap of the glimpse boxes over the C(T, 2) pairs.
        ordinal: L_s, |E[score] - score of the label|.
        accuracy: fraction of tiles whose last-step prediction is right (no gradient).
    """

    total: torch.Tensor
    classification: torch.Tensor
    reinforce: torch.Tensor
    baseline: torch.Tensor
    overlap: torch.Tensor
    ordinal: torch.Tensor
    accuracy: torch.Tensor


def discounted_returns(rewards: torch.Tensor, discount: float) -> torch.Tensor:
    """(B, T) returns R_t = Σ_{t' >= t} discount^(t' - t)·r_t' of (B, T) rewards."""
    returns = torch.empty_like(rewards)
    running = rewards.new_zeros(rewards.shape[0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = rewards[:, t] + discount * running
        returns[:, t] = running
    return returns


def box_overlap(means: torch.Tensor, box_px: int, tile_px: int) -> torch.Tensor:
    """(B,) mean overlap of the square glimpse boxes over all C(T, 2) pairs of steps.

    The overlap of two boxes is their intersection's area over a box's area (all boxes
    have the same size), so 1 for identical boxes and 0 for disjoint ones. Boxes are the
    unrounded, unclipped squares of ``box_px`` tile pixels around the means, so the term
    is differentiable and pushes overlapping means apart; for T = 1 it is 0.

    Args:
        means: (B, T, 2) centres in [-1, 1].
        box_px: the box edge in tile pixels.
        tile_px: the tile edge in pixels.
    """
    batch, n_steps, _ = means.shape
    if n_steps < 2:
        return means.new_zeros(batch)
    side = 2.0 * box_px / tile_px  # box edge in [-1, 1] units
    first, second = torch.triu_indices(n_steps, n_steps, offset=1, device=means.device)
    gap = (means[:, first] - means[:, second]).abs()  # (B, pairs, 2)
    shared = torch.relu(side - gap)  # (B, pairs, 2), the intersection's width and height
    return (shared[..., 0] * shared[..., 1] / side**2).mean(dim=1)


def hard_attention_loss(
    episode: GlimpseEpisode, labels: torch.Tensor, config: HardAttentionConfig
) -> HardAttentionLoss:
    """L_HA = L_θ + δ_bb·L_bb + δ_s·L_s of an episode (the paper's Eq. 6 to 9).

    - L_θ = cross-entropy + REINFORCE + baseline regression. Cross-entropy trains the
      classifier on the last step's scores (Y_T), or on every step's, averaged, with
      ``supervise_all_steps``. The reward of step t is 1 when its prediction is right;
      returns R_t = Σ_{t' >= t} γ^(t' - t) r_t' (γ = ``discount``); the policy term is
      -Σ_t log π(l_t)·(R_t - b_t) with the advantage detached (the random first location
      has log π = 0), and the baseline is fitted to R_t by mean squared error.
    - L_bb (``box_overlap``) is computed on the policy means, not on the sampled locations
      (which carry no gradient), with the largest-scale glimpse as the box; the first,
      random location takes part as a constant.
    - L_s = |Σ_k p_k·rank(k) - rank(label)| with ranks from the risk order: the expected
      score, so that it has a gradient (PAPERS.md §2). It is in score units (0 .. K - 1,
      the paper's |Y - GT|, not divided by K - 1), on the same steps as the cross-entropy.

    Every term is a mean over the batch.

    Args:
        episode: the model's output.
        labels: (B,) class indices.
        config: the model's settings (weights, discount, risk order).
    """
    logits = episode.logits  # (B, T, K)
    batch, _, n_classes = logits.shape
    labels = labels.to(logits.device).long()
    scored = logits if config.supervise_all_steps else logits[:, -1:]  # (B, T', K)
    steps = scored.shape[1]
    classification = F.cross_entropy(
        scored.reshape(batch * steps, n_classes), labels.repeat_interleave(steps)
    )

    rewards = (logits.detach().argmax(-1) == labels[:, None]).float()  # (B, T)
    returns = discounted_returns(rewards, config.discount)  # (B, T)
    advantage = (returns - episode.baselines).detach()
    reinforce = -(episode.log_probs * advantage).sum(dim=1).mean()
    baseline = F.mse_loss(episode.baselines, returns)

    box_px = scale_px(episode.glimpse_px, episode.scales[-1])
    overlap = box_overlap(episode.means, box_px, episode.tile_px).mean()

    rank = torch.empty(n_classes, device=logits.device)
    rank[list(config.risk)] = torch.arange(n_classes, dtype=rank.dtype, device=rank.device)
    expected = (torch.softmax(scored, dim=-1) * rank).sum(-1)  # (B, T')
    ordinal = (expected - rank[labels][:, None]).abs().mean()

    total = (
        classification
        + reinforce
        + baseline
        + config.overlap_weight * overlap
        + config.ordinal_weight * ordinal
    )
    accuracy = rewards[:, -1].mean()
    return HardAttentionLoss(total, classification, reinforce, baseline, overlap, ordinal, accuracy)
