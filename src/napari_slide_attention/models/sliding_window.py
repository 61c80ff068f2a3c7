"""The sliding-window baseline of Tomita et al. 2019 (Table 2): a crop classifier plus a
thresholding heuristic that turns its tile probabilities into a slide's call.

The crop classifier is a pre-activation ResNet-18 trunk (the same trunk as the grid
attention model, so pretrained weights and normalisation carry over), global pooling,
dropout and one fully connected layer. It is trained on crops cut around annotated
lesion boxes (and on lesion-free tissue as the lowest-risk class), then applied to every
tissue tile of a slide. The paper tuned "thresholds for filtering noise" on its
validation set and aggregated the crop predictions with a pathologist's heuristic that it
does not spell out; ``aggregate_tiles`` is ours (see there), with per-class thresholds
and minimum tile counts that training tunes on the validation split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .device import Autocast
from .tile_network import (
    MAX_INPUT_PX,
    MAX_TILE_UM,
    MIN_TILE_UM,
    ModelConfig,
    TileNetwork,
    check_range,
)

__all__ = ["MODEL_KIND", "CropClassifier", "SlidingWindowConfig", "aggregate_tiles"]

MODEL_KIND = "sliding-window"


@dataclass
class SlidingWindowConfig(ModelConfig):
    """Sizes and settings of a sliding-window crop classifier (saved with every checkpoint).

    Attributes:
        classes: class names, in the order of the model's outputs.
        risk_order: class indices from lowest to highest risk; empty = the order of
            ``classes``. The lowest-risk class is the one lesion-free tissue takes.
        crop_um: crop (tile) edge in micrometres at the slide (492 px at 20x = 246 µm).
        input_px: crop edge fed to the trunk (crops are resized; 224 in the paper).
        trainable_blocks: how many of the trunk's last stages train (5 = everything, stem
            included, as the paper's baseline trained from He initialisation; 0 = frozen).
        dropout: dropout before the classifier.
        mean, std: per-channel normalisation of pixels scaled to [0, 1] (cohort statistics).
        thresholds: per class, the probability a tile needs to count for that class
            (``aggregate_tiles``); the lowest-risk class's entry is not used. Empty = 0.5
            for every class.
        min_counts: per class, how many such tiles make a slide (or piece) that class; the
            lowest-risk class's entry is not used. Empty = 1 for every class.
    """

    classes: tuple[str, ...]
    risk_order: tuple[int, ...] = ()
    crop_um: float = 246.0
    input_px: int = 224
    trainable_blocks: int = 5
    dropout: float = 0.5
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    thresholds: tuple[float, ...] = ()
    min_counts: tuple[int, ...] = ()
    kind: str = field(default=MODEL_KIND, init=False)

    def __post_init__(self) -> None:
        self._check_classes()
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.trainable_blocks <= 5:
            raise ValueError(f"trainable_blocks must be 0..5, got {self.trainable_blocks}")
        if self.crop_um <= 0 or self.input_px < 16:
            raise ValueError("crop_um must be positive and input_px at least 16")
        check_range("crop_um", self.crop_um, MIN_TILE_UM, MAX_TILE_UM)
        check_range("input_px", self.input_px, 16, MAX_INPUT_PX)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need 3 values, std positive")
        n = len(self.classes)
        # explicit values in every saved config, so a checkpoint says what it will do
        self.thresholds = tuple(float(v) for v in self.thresholds) or (0.5,) * n
        self.min_counts = tuple(int(v) for v in self.min_counts) or (1,) * n
        _check_rule(self.thresholds, self.min_counts, n)


def _check_rule(thresholds: Sequence[float], min_counts: Sequence[int], n_classes: int) -> None:
    if len(thresholds) != n_classes or len(min_counts) != n_classes:
        raise ValueError(
            f"thresholds and min_counts need one value per class ({n_classes}), got "
            f"{len(thresholds)} and {len(min_counts)}"
        )
    if not all(0.0 <= t <= 1.0 for t in thresholds):
        raise ValueError(f"thresholds must lie in [0, 1], got {list(thresholds)}")
    if min(min_counts) < 1:
        raise ValueError(f"min_counts must be at least 1, got {list(min_counts)}")


def aggregate_tiles(
    tile_probabilities: np.ndarray,
    thresholds: Sequence[float],
    min_counts: Sequence[int],
    risk: Sequence[int],
) -> tuple[np.ndarray, int]:
    """The (C,) probabilities and class index of a slide (or piece) from its tiles'.

    The heuristic (ours; the paper tuned noise thresholds on its validation set and a
    pathologist's aggregation rule it does not describe): going from the highest-risk
    class down, the first class k other than the lowest-risk one that has at least
    ``min_counts[k]`` tiles with ``p_k >= thresholds[k]`` is the call; a few confident
    tiles suffice, since lesions are small, while the count filters isolated false
    positives. With no such class the call is the lowest-risk class.

    The probabilities summarise the evidence for the call: the mean probability vector
    of the ``min_counts[k]`` tiles with the highest ``p_k`` for a call k, or the mean of
    all tiles for the lowest-risk class, renormalised. The call is the rule's, not the
    argmax of these probabilities: they agree for calls above the lowest-risk class when
    the thresholds are at least 0.5, but a lowest-risk call can come with a higher class
    most probable on average (many tiles just below its threshold).

    Args:
        tile_probabilities: (N, C) class probabilities of the tiles, N >= 1.
        thresholds: (C,) per-class probability thresholds (lowest-risk entry unused).
        min_counts: (C,) per-class minimum tile counts, each >= 1 (lowest-risk entry unused).
        risk: class indices from lowest to highest risk.

    Returns:
        The (C,) float32 probabilities and the index of the class called.

    Raises:
        ValueError: no tiles, or arguments of the wrong size.
    """
    probs = np.asarray(tile_probabilities, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"need (N, C) tile probabilities with N >= 1, got shape {probs.shape}")
    n_classes = probs.shape[1]
    thresholds = [float(t) for t in thresholds]
    min_counts = [int(m) for m in min_counts]
    _check_rule(thresholds, min_counts, n_classes)
    if sorted(int(r) for r in risk) != list(range(n_classes)):
        raise ValueError(f"risk must list each of the {n_classes} class indices once")
    for k in reversed([int(r) for r in risk[1:]]):
        column = probs[:, k]
        if np.count_nonzero(column >= thresholds[k]) >= min_counts[k]:
            # stable sort: among equal p_k the earlier tile (row-major) wins
            top = np.argsort(-column, kind="stable")[: min_counts[k]]
            return _renormalised(probs[top].mean(0)), k
    return _renormalised(probs.mean(0)), int(risk[0])


def _renormalised(p: np.ndarray) -> np.ndarray:
    total = p.sum()
    return (p / total if total > 0 else np.full_like(p, 1.0 / p.size)).astype(np.float32)


class CropClassifier(TileNetwork):
    """The sliding-window baseline's crop classifier: ResNet-18 trunk, dropout, linear.

    Args:
        config: sizes and settings.
    """

    def __init__(self, config: SlidingWindowConfig):
        super().__init__(config)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(self.trunk.n_features, len(config.classes))
        self._finish_init()

    # -- set-up --------------------------------------------------------------------------
    def reset_head(self) -> None:
        """Glorot initialisation of the classifier, zero bias (the trunk is He-initialised)."""
        nn.init.xavier_uniform_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def set_rule(self, thresholds: Sequence[float], min_counts: Sequence[int]) -> None:
        """Use these per-class thresholds and minimum tile counts in ``aggregate_tiles``."""
        thresholds = tuple(float(t) for t in thresholds)
        min_counts = tuple(int(m) for m in min_counts)
        _check_rule(thresholds, min_counts, len(self.config.classes))
        self.config.thresholds, self.config.min_counts = thresholds, min_counts

    # -- crops -> classes ----------------------------------------------------------------
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) logits of prepared input (``prepare``'s output)."""
        features = self.trainable_features(self.frozen_features(x))  # (N, 512)
        return self.classifier(self.dropout(features))

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """(N, C) logits of raw tiles (uint8 NHWC or float NCHW in [0, 1])."""
        return self.classify(self.prepare(tiles))

    @torch.no_grad()
    def probabilities(
        self, tiles: torch.Tensor, device: torch.device, autocast: Autocast
    ) -> torch.Tensor:
        """(n, C) float32 class probabilities of one batch of raw tiles (on the CPU)."""
        with autocast():
            logits = self.classify(self.prepare_on(tiles, device))
        return torch.softmax(logits.float(), 1).cpu()
