"""What every tile model shares: a pre-activation ResNet trunk with frozen stages,
input preparation (scaling, resizing, normalisation) and mixed-precision choice.

``GridAttention`` and the sliding window's ``CropClassifier`` both subclass
``TileNetwork``; only their heads differ.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .device import model_device
from .preact_resnet import PreActResNet, preact_resnet18

__all__ = ["ModelConfig", "TileNetwork"]


class ModelConfig:
    """What the model configs share (dataclasses with ``classes``, ``risk_order`` and a
    non-init ``kind``): the risk order and a JSON round trip that refuses unknown keys."""

    @property
    def risk(self) -> tuple[int, ...]:
        """Class indices from lowest to highest risk."""
        return self.risk_order or tuple(range(len(self.classes)))

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values."""
        data = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    def _check_classes(self) -> None:
        """Make ``classes`` a tuple of names and ``risk_order`` a tuple of indices, and
        refuse fewer than 2 classes, repeated names or a risk order that is not a
        permutation of the class indices (for ``__post_init__``)."""
        self.classes = tuple(str(c) for c in self.classes)
        self.risk_order = tuple(int(i) for i in (self.risk_order or ()))
        n = len(self.classes)
        if n < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {list(self.classes)}")
        if len(set(self.classes)) != n:
            raise ValueError(f"class names repeat: {list(self.classes)}")
        if self.risk_order and sorted(self.risk_order) != list(range(n)):
            raise ValueError(
                f"risk_order must list each class index once, got {list(self.risk_order)}"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Settings from ``to_dict`` output (unknown keys are an error)."""
        data = {k: v for k, v in data.items() if k != "kind"}
        fields = cls.__dataclass_fields__
        unknown = sorted(set(data) - {f.name for f in fields.values() if f.init})
        if unknown:
            raise ValueError(f"unknown {fields['kind'].default} settings: {', '.join(unknown)}")
        return cls(**data)


class TileNetwork(nn.Module):
    """A pre-activation ResNet-18 trunk over tiles, its last stages trainable.

    The config must provide ``trainable_blocks`` (how many of the trunk's last stages
    train: 1 = ``layer4``, 5 = all, stem included), ``input_px``, ``mean`` and ``std``.
    Subclasses build their head, then call ``_finish_init()``.

    Args:
        config: the model's settings.
    """

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.trunk: PreActResNet = preact_resnet18()
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1))

    def _finish_init(self) -> None:
        self.reset_head()
        for stage in self.frozen_stages:
            for p in stage.parameters():
                p.requires_grad_(False)
        if self.config.trainable_blocks == 0:
            for p in self.trunk.final_bn.parameters():
                p.requires_grad_(False)

    def reset_head(self) -> None:
        """Initialise the head (subclasses)."""

    # -- trunk stages ------------------------------------------------------------------
    @property
    def frozen_stages(self) -> list[nn.Module]:
        """Trunk stages that never train (run without autograd, BN in eval mode)."""
        stages = [stage for _, stage in self.trunk.stages()]
        return stages[: len(stages) - self.config.trainable_blocks]

    @property
    def trainable_stages(self) -> list[nn.Module]:
        """Trunk stages that train."""
        stages = [stage for _, stage in self.trunk.stages()]
        return stages[len(stages) - self.config.trainable_blocks :]

    def train(self, mode: bool = True) -> TileNetwork:
        """Train mode for the trainable parts; frozen stages always use running statistics."""
        super().train(mode)
        for stage in self.frozen_stages:
            stage.eval()
        if self.config.trainable_blocks == 0:
            self.trunk.final_bn.eval()
        return self

    def set_normalisation(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Use these per-channel statistics (pixels in [0, 1]) from now on."""
        self.config.mean = tuple(float(v) for v in mean)
        self.config.std = tuple(float(v) for v in std)
        self.mean.copy_(torch.tensor(self.config.mean).view(1, 3, 1, 1))
        self.std.copy_(torch.tensor(self.config.std).view(1, 3, 1, 1))

    # -- tiles -> features ---------------------------------------------------------------
    def prepare(self, tiles: torch.Tensor) -> torch.Tensor:
        """(N, h, w, 3) uint8 or (N, 3, h, w) float tiles -> normalised (N, 3, s, s) input.

        uint8 tiles are scaled to [0, 1]; tiles not ``input_px`` square are resized with
        antialiasing.
        """
        if tiles.dtype == torch.uint8:
            if tiles.shape[-1] == 3:
                tiles = tiles.permute(0, 3, 1, 2)  # (N, 3, h, w)
            tiles = tiles.float().div_(255.0)
        size = self.config.input_px
        if tuple(tiles.shape[-2:]) != (size, size):
            tiles = F.interpolate(
                tiles, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
        return (tiles - self.mean) / self.std

    def prepare_on(self, tiles: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``prepare`` on ``device`` (channels-last memory on CUDA); call under autocast."""
        x = self.prepare(tiles.to(device, non_blocking=True))
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen stages' output for prepared tiles (no autograd)."""
        with torch.no_grad():
            for stage in self.frozen_stages:
                x = stage(x)
        return x

    def trainable_features(self, h: torch.Tensor) -> torch.Tensor:
        """The trainable stages and pooling: frozen output -> (N, 512) features."""
        for stage in self.trainable_stages:
            h = stage(h)
        return self.trunk.head_features(h)

    def embed(self, tiles: torch.Tensor) -> torch.Tensor:
        """(N, 512) features of raw tiles (uint8 NHWC or float NCHW)."""
        return self.trainable_features(self.frozen_features(self.prepare(tiles)))

    # -- bookkeeping ---------------------------------------------------------------------
    def calibrate_frozen_batchnorm(self, batches: Iterable[torch.Tensor]) -> int:
        """Estimate the frozen stages' BN statistics from tiles (for an untrained trunk).

        A frozen trunk that was never trained has BN running statistics of 0 and 1,
        which do not match its activations; with no pretrained weights, set them from
        cohort tiles once before training. Returns the number of tiles used (0 when no
        stage is frozen: trained BN layers need no help).
        """
        frozen = list(self.frozen_stages)
        if self.config.trainable_blocks == 0:
            frozen.append(self.trunk.final_bn)
        bns = [m for s in frozen for m in s.modules() if isinstance(m, nn.BatchNorm2d)]
        if not bns:
            return 0
        saved = [(m, m.momentum) for m in bns]
        count = 0
        device = model_device(self)
        try:
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration batches
                m.train()
            with torch.no_grad():
                for tiles in batches:
                    x = self.prepare(tiles.to(device))
                    for stage in frozen:
                        x = stage(x)
                    count += tiles.shape[0]
        finally:
            for m, momentum in saved:
                m.momentum = momentum
            self.train(self.training)
        return count
