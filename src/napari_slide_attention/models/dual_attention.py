"""Dual attention (Raza et al.): soft attention on the low-power view, attention sampling of
tiles, and a recurrent hard-attention glimpse model on each sampled tile.

The three trainable parts live in one module so that one checkpoint holds them:

``soft``      ``SoftAttention``: a small CNN on the slide at x32 down (2.5x) with its
              tissue mask -> an attention distribution A over the cells of the view
``features``  the tile feature network f_f of attention sampling (a pre-activation
              ResNet-8, 32 channels, on tiles resized to ``feature_px``) and ``head``, a
              linear classifier on the expectation of the tile features under A
              (Katharopoulos & Fleuret 2019): this is how the soft attention learns, the
              gradient reaching A through ``expected_without_replacement``
``hard``      ``HardAttention``: T glimpses at two magnifications per sampled tile, an LSTM
              core and a Gaussian location policy trained with REINFORCE

The soft attention's loss is L_SA = cross-entropy of ``head`` + β·(−entropy of A) (the
paper's equation 3 names only the entropy term; the task term is how attention sampling
trains its attention, section III-B). The joint loss is L_J = L_HA + α^e·L_SA.

Extensions for sparse lesions (ours, PAPERS.md §2, off by default): a sharper A
(``soft``'s ``temperature`` and ``top_k``, see ``soft_attention.sharpen``), and
``slide_call`` "highest-risk" for a hard attention whose tiles were labelled from
regions (``train/dual.py``'s ``tile_labels``): a tile then shows a lesion's class or the
lowest-risk class, so the slide takes the highest-risk class any of its tiles shows.

Reading slides is not done here (``models/`` never touches files): ``train/dual.py``
reads the view and the tiles and calls ``attend``, ``soft_loss`` and ``hard``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .hard_attention import HardAttention, HardAttentionConfig
from .preact_resnet import preact_resnet8
from .sampling import expected_without_replacement
from .soft_attention import SoftAttention, SoftAttentionConfig, SoftAttentionOutput, entropy_loss
from .tile_network import (
    MAX_INPUT_PX,
    MAX_TILE_UM,
    MIN_TILE_UM,
    ModelConfig,
    check_range,
)

__all__ = [
    "MODEL_KIND",
    "SLIDE_CALLS",
    "STAIN_SAMPLING",
    "DualAttention",
    "DualAttentionConfig",
    "SoftLoss",
]

MODEL_KIND = "dual-attention"
REFINEMENTS = ("threshold", "kmeans", "none")
# The paper's attention sampling for each of its stains (Sec. III-C): the refinement of Â,
# the noise range and N of the top 2N. HER2 is DualAttentionConfig's default.
STAIN_SAMPLING: dict[str, dict[str, Any]] = {
    "her2": {"refine": "threshold", "noise": [0.0, 1.0], "n_tiles": 10, "candidates": 20},
    "mmr": {"refine": "kmeans", "noise": [-2.0, 1.0], "n_tiles": 15, "candidates": 30},
}
SLIDE_CALLS = ("most-frequent", "highest-risk")


@dataclass
class DualAttentionConfig(ModelConfig):
    """The dual model's settings; the paper's values are the defaults (HER2 set-up).

    Attributes:
        classes: class names (index order of the outputs).
        risk_order: class indices from lowest to highest risk (None = index order); the
            ordinal loss L_s and the slide call's tie-break use it.
        view_downsample: level-0 px per px of the soft attention's view (32: 2.5x from 40x).
        soft: ``SoftAttentionConfig`` settings (layers, channels, pool, entropy_weight, ...).
        n_tiles: N, tiles sampled per slide (HER2 10, MMR 15).
        candidates: how many top locations the distinct N are chosen from (None = 2N).
        min_distance: d_t, the least Euclidean distance between two sampled tiles, in
            attention cells (None = the tile edge in cells, so tiles are apart).
        refine: "threshold" (HER2 "positive" maps), "kmeans" (MMR "tumour" maps) or "none".
        noise: [low, high] of the uniform noise added inside the mask (HER2 [0, 1], MMR
            [-2, 1]).
        tile_um: tile edge in micrometres (2048 px at 40x, 0.25 µm/px = 512 µm).
        feature_px: tiles are resized to this for the soft attention's feature network.
        feature_width: channels of that ResNet-8.
        hard: ``HardAttentionConfig`` settings (glimpses, glimpse_px, scales, tile_px, ...);
            ``tile_px`` is the edge the tile is read at for the glimpses.
        joint_alpha: α of the joint loss L_J = L_HA + α^e·L_SA (e = epoch).
        slide_call: how the tile classes make the slide's: "most-frequent" (the paper:
            the most frequent tile class, its probabilities the mean tile probabilities)
            or "highest-risk" (ours, for tiles labelled from regions: the highest-risk
            class predicted for any tile, with that tile's probabilities).
    """

    classes: tuple[str, ...]
    risk_order: tuple[int, ...] | None = None
    view_downsample: float = 32.0
    soft: dict[str, Any] = field(default_factory=dict)
    n_tiles: int = 10
    candidates: int | None = None
    min_distance: float | None = None
    refine: str = "threshold"
    noise: tuple[float, float] = (0.0, 1.0)
    tile_um: float = 512.0
    feature_px: int = 128
    feature_width: int = 32
    hard: dict[str, Any] = field(default_factory=dict)
    joint_alpha: float = 0.5
    slide_call: str = "most-frequent"
    kind: str = field(default=MODEL_KIND, init=False)

    def __post_init__(self) -> None:
        unordered = self.risk_order is None
        self._check_classes()  # and every field's type
        if unordered:
            self.risk_order = None
        self.noise = tuple(float(v) for v in self.noise)
        self.soft = dict(self.soft)
        self.hard = dict(self.hard)
        for name in ("classes", "risk_order"):
            if name in self.hard:
                raise ValueError(f"hard attention's {name} come from the dual model's")
        if not self.view_downsample > 0:
            raise ValueError(f"view_downsample must be positive, got {self.view_downsample}")
        if self.n_tiles < 1:
            raise ValueError(f"n_tiles must be at least 1, got {self.n_tiles}")
        if self.candidates is not None and self.candidates < self.n_tiles:
            raise ValueError(
                f"candidates ({self.candidates}) must be at least n_tiles ({self.n_tiles})"
            )
        if self.refine not in REFINEMENTS:
            raise ValueError(f"refine must be one of {REFINEMENTS}, got {self.refine!r}")
        low, high = self.noise
        if not high >= low:
            raise ValueError(f"noise must be [low, high] with high >= low, got {self.noise}")
        if not self.tile_um > 0 or self.feature_px < 8 or self.feature_width < 1:
            raise ValueError("tile_um must be positive, feature_px >= 8 and feature_width >= 1")
        check_range("view_downsample", self.view_downsample, 1, 1024)
        check_range("n_tiles", self.n_tiles, 1, 1024)
        if self.candidates is not None:
            check_range("candidates", self.candidates, self.n_tiles, 65536)
        if self.min_distance is not None:
            check_range("min_distance", self.min_distance, 0, 1e6)
        for value in self.noise:
            check_range("noise", value, -1e6, 1e6)
        check_range("tile_um", self.tile_um, MIN_TILE_UM, MAX_TILE_UM)
        check_range("feature_px", self.feature_px, 8, MAX_INPUT_PX)
        check_range("feature_width", self.feature_width, 1, 1024)
        if not 0 <= self.joint_alpha <= 1:
            raise ValueError(f"joint_alpha must be in [0, 1], got {self.joint_alpha}")
        if self.slide_call not in SLIDE_CALLS:
            raise ValueError(f"slide_call must be one of {SLIDE_CALLS}, got {self.slide_call!r}")
        # Build the parts' configs once, so bad part settings fail here, with their message.
        for part, build in (("soft", self.soft_config), ("hard", self.hard_config)):
            config_type = SoftAttentionConfig if part == "soft" else HardAttentionConfig
            known = {f.name for f in fields(config_type) if f.init}
            unknown = sorted(set(getattr(self, part)) - known)
            if unknown:
                raise ValueError(f"unknown {part} settings: {', '.join(map(str, unknown))}")
            try:
                build()
            except ValueError as exc:
                raise ValueError(f"{part}: {exc}") from None

    def soft_config(self) -> SoftAttentionConfig:
        """The soft attention's configuration."""
        return SoftAttentionConfig(**self.soft)

    def hard_config(self) -> HardAttentionConfig:
        """The hard attention's configuration (with this model's classes and risk order)."""
        return HardAttentionConfig(classes=self.classes, risk_order=self.risk_order, **self.hard)

    @property
    def cell_px(self) -> float:
        """Level-0 px per attention cell: the view's downsample times the pooling."""
        return self.view_downsample * self.soft_config().pool


@dataclass(frozen=True)
class SoftLoss:
    """The soft attention's loss on one slide and its parts.

    Attributes:
        total: L_SA = classification + entropy.
        classification: cross-entropy of the expected tile features' class scores.
        entropy: β·(−entropy of A) (minimising it spreads the attention).
        logits: (1, K) class scores from the expectation over the sampled tiles.
    """

    total: torch.Tensor
    classification: torch.Tensor
    entropy: torch.Tensor
    logits: torch.Tensor


class DualAttention(nn.Module):
    """Soft attention + attention sampling + hard attention (Raza et al.).

    Args:
        config: the settings.
    """

    def __init__(self, config: DualAttentionConfig):
        super().__init__()
        self.config = config
        self.soft = SoftAttention(config.soft_config())
        self.features = preact_resnet8(config.feature_width)
        self.head = nn.Linear(self.features.n_features, len(config.classes))
        self.hard = HardAttention(config.hard_config())
        # Tile normalisation (cohort tissue statistics), shared by f_f and the glimpses.
        self.register_buffer("mean", torch.full((3,), 0.5))
        self.register_buffer("std", torch.full((3,), 0.25))

    # -- normalisation -----------------------------------------------------------------
    def set_normalisation(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Per-channel mean and std (in [0, 1] units) the tiles are normalised with."""
        self.mean.copy_(torch.as_tensor(mean, dtype=self.mean.dtype))
        self.std.copy_(torch.as_tensor(std, dtype=self.std.dtype))
        # The hard attention normalises its own glimpses; keep its saved config in step.
        self.hard.set_normalisation(mean, std)
        self.config.hard = {
            **self.config.hard,
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
        }

    def prepare(self, tiles: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """(N, h, w, 3) uint8 tiles -> (N, 3, size, size) normalised float (resized when
        ``size`` differs, with antialiasing)."""
        x = tiles.permute(0, 3, 1, 2).float().div_(255.0)  # (N, 3, h, w)
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        return (x - self.mean[:, None, None]) / self.std[:, None, None]

    # -- the three parts -----------------------------------------------------------------
    def attend(
        self,
        view: torch.Tensor,
        tissue: torch.Tensor,
        explore: torch.Generator | None = None,
    ) -> SoftAttentionOutput:
        """Soft attention over a view.

        Args:
            view: (B, h, w, 3) uint8 views.
            tissue: (B, h, w) bool tissue masks.
            explore: with the soft attention's ``top_k``, draw its k cells from A with
                this generator (training) instead of taking the k largest.
        """
        image = view.permute(0, 3, 1, 2)  # (B, 3, h, w) uint8: floats strip by strip
        return self.soft(image, tissue, explore=explore)

    def soft_loss(
        self,
        attention: SoftAttentionOutput,
        tiles: torch.Tensor,
        indices: torch.Tensor,
        label: torch.Tensor,
        class_weights: torch.Tensor | None = None,
    ) -> SoftLoss:
        """L_SA for one view (``soft_losses`` for one slide)."""
        return self.soft_losses([attention], [tiles], [indices], label, class_weights)[0]

    def soft_losses(
        self,
        attentions: Sequence[SoftAttentionOutput],
        tiles: Sequence[torch.Tensor],
        indices: Sequence[torch.Tensor],
        labels: torch.Tensor,
        class_weights: torch.Tensor | None = None,
    ) -> list[SoftLoss]:
        """L_SA for each of several views: the class scores of the expected tile features
        under A, estimated from tiles sampled from A without replacement, plus the entropy
        term.

        The tiles of all the views go through the feature network as one batch, so in
        training its batch normalisation takes its statistics over the slides of a step
        (mixed classes), not over one slide's tiles: statistics of one slide would
        subtract that slide's mean, its staining level included, which is the very signal
        that tells a HER2 3+ slide from a 0 (our decision, docs/models.md).

        With the soft attention's ``top_k``, when the samples are all of A's k cells, the
        expectation is their exact A-weighted sum (the pooled expectation over the k
        cells) rather than the estimate from a draw.

        Args:
            attentions: ``attend``'s output for each view (B = 1 each).
            tiles: per view, (N_i, 3, p, p) prepared tiles at its sampled cells, in
                sampling order.
            indices: per view, (1, N_i) flat cell indices of the samples, in sampling order.
            labels: (V,) class index of each view.
            class_weights: cross-entropy class weights, or None.
        """
        sizes = [int(t.shape[0]) for t in tiles]
        all_feats = self.features(torch.cat(list(tiles)))  # (sum N_i, F)
        losses = []
        for attention, feats, index, label in zip(
            attentions, all_feats.split(sizes), indices, labels, strict=True
        ):
            flat = attention.attention.flatten(1)  # (1, P)
            if self.soft.config.top_k and index.shape[1] >= int((flat > 0).sum()):
                weights = flat.gather(1, index)  # (1, N): every cell of A, summing to 1
                expected = (weights[..., None] * feats[None]).sum(1)  # (1, F)
            else:
                expected = expected_without_replacement(flat, index, feats[None])  # (1, F)
            logits = self.head(expected)  # (1, K)
            ce = F.cross_entropy(logits, label[None], weight=class_weights)
            ent = entropy_loss(
                attention.attention, attention.tissue, self.soft.config.entropy_weight
            ).mean()
            losses.append(SoftLoss(ce + ent, ce, ent, logits))
        return losses

    def joint_weight(self, epoch: int) -> float:
        """α^e, the soft attention loss's weight in the joint loss at ``epoch``."""
        return float(self.config.joint_alpha**epoch)
