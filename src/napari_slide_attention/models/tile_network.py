"""What every tile model shares: a pre-activation ResNet trunk with frozen stages,
input preparation (scaling, resizing, normalisation) and mixed-precision choice.

``GridAttention`` and the sliding window's ``CropClassifier`` both subclass
``TileNetwork``; only their heads differ.
"""

from __future__ import annotations

import functools
import math
import numbers
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import MISSING, asdict, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .device import model_device
from .preact_resnet import PreActResNet, preact_resnet18

__all__ = [
    "MAX_INPUT_PX",
    "MAX_TILE_UM",
    "MAX_WIDTH",
    "MIN_TILE_UM",
    "ModelConfig",
    "TileNetwork",
    "check_field_types",
    "check_range",
]

# Sane sizes for the models' settings. A tile edge in micrometres below MIN_TILE_UM cuts
# a slide into millions of tiles of a few pixels (a 0.001 µm tile "hung" inference);
# above MAX_TILE_UM a tile is wider than most slides. A network input edge above
# MAX_INPUT_PX (the paper: 224) or a layer wider than MAX_WIDTH only exhausts memory.
MIN_TILE_UM = 16.0
MAX_TILE_UM = 8192.0
MAX_INPUT_PX = 4096
MAX_WIDTH = 8192

# Bounds on any setting, whatever it means: no size we build, no tuple we keep, no class
# list a checkpoint holds comes near them, so a value past them is a damaged or hostile
# file, refused before anything is sized by it.
_MAX_INT = 2**31 - 1
_MAX_ITEMS = 256
_MAX_TEXT = 1000


def _shown(value: Any) -> str:
    """``value`` for an error message, cut short (a damaged file may hold megabytes)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_problem(value: Any, hint: Any) -> str | None:
    """What is wrong with ``value`` for the annotation ``hint``, or None if it fits."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return None
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        problems = [_type_problem(value, a) for a in args if a is not type(None)]
        return None if None in problems else problems[0]
    if hint is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            return "must be a whole number"
        return None if abs(int(value)) <= _MAX_INT else "is out of range"
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return "must be a number"
        return None if math.isfinite(value) else "must be a finite number"
    if hint is str:
        if not isinstance(value, str):
            return "must be a string"
        return None if len(value) <= _MAX_TEXT else "is too long"
    if origin is tuple:
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            return "must be a list"
        if len(args) == 2 and args[1] is Ellipsis:
            if len(value) > _MAX_ITEMS:
                return f"must have at most {_MAX_ITEMS} values"
            args = (args[0],) * len(value)
        elif len(value) != len(args):
            return f"must be a list of {len(args)} values"
        for index, (item, item_hint) in enumerate(zip(value, args, strict=True)):
            problem = _type_problem(item, item_hint)
            if problem is not None:
                return f"[{index}] {problem}"
        return None
    if origin is dict:
        if not isinstance(value, Mapping):
            return "must be a JSON object"
        if not all(isinstance(k, str) for k in value):
            return "must have string keys"
        return None if len(value) <= _MAX_ITEMS else "has too many keys"
    return None


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_field_types(config: Any, where: str = "") -> None:
    """Refuse a config field whose value is not of its annotated kind (for
    ``__post_init__``: a checkpoint's header, ``--set`` or a settings record may hold a
    list where a number belongs, a string where a list does, NaN, ...).

    Args:
        config: a dataclass instance.
        where: prefix for the field's name in messages (e.g. "hard.").

    Raises:
        ValueError: naming the first field that does not fit.
    """
    hints = _hints(type(config))
    for f in fields(config):
        if not f.init:
            continue
        value = getattr(config, f.name)
        problem = _type_problem(value, hints[f.name])
        if problem is not None:
            space = "" if problem.startswith("[") else " "
            raise ValueError(f"{where}{f.name}{space}{problem}, got {_shown(value)}")


def check_range(name: str, value: float, low: float, high: float) -> None:
    """Refuse ``value`` outside [low, high], naming the setting.

    Raises:
        ValueError: out of range.
    """
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {low:g}..{high:g}, got {_shown(value)}")


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
        """Check every field's type (``check_field_types``), make ``classes`` a tuple of
        names and ``risk_order`` a tuple of indices, and refuse fewer than 2 classes,
        empty or repeated names or a risk order that is not a permutation of the class
        indices (for ``__post_init__``)."""
        check_field_types(self)
        self.classes = tuple(str(c) for c in self.classes)
        self.risk_order = tuple(int(i) for i in (self.risk_order or ()))
        n = len(self.classes)
        if n < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {list(self.classes)}")
        if len(set(self.classes)) != n:
            raise ValueError(f"class names repeat: {list(self.classes)}")
        if not all(c.strip() for c in self.classes):
            raise ValueError(f"class names must not be empty, got {list(self.classes)}")
        if self.risk_order and sorted(self.risk_order) != list(range(n)):
            raise ValueError(
                f"risk_order must list each class index once, got {list(self.risk_order)}"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Settings from ``to_dict`` output (unknown keys are an error)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"settings must be a JSON object, got {_shown(data)}")
        data = {k: v for k, v in data.items() if k != "kind"}
        fields = cls.__dataclass_fields__
        unknown = sorted(set(data) - {f.name for f in fields.values() if f.init})
        if unknown:
            raise ValueError(f"unknown {fields['kind'].default} settings: {', '.join(unknown)}")
        missing = [
            f.name
            for f in fields.values()
            if f.init
            and f.name not in data
            and f.default is MISSING
            and f.default_factory is MISSING
        ]
        if missing:
            raise ValueError(f"{', '.join(missing)} missing")
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
