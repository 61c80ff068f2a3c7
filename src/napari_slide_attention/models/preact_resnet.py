"""Pre-activation ResNets (He et al. 2016, "Identity mappings in deep residual networks").

The grid-attention model uses the 18-layer network as a tile feature extractor: the
classifier is removed and global average pooling gives 512 features per tile. Blocks
are numbered as in torchvision (``stem``, ``layer1`` … ``layer4``) so that weights
converted from common checkpoints load by name.

Weights never download: ``load_weights`` reads a local file the user names
(safetensors, or a torch state dict read with ``weights_only=True``, which never
unpickles code) and reports which tensors loaded and which did not.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "BLOCK_NAMES",
    "PreActBlock",
    "PreActResNet",
    "WeightsError",
    "WeightsReport",
    "load_weights",
    "preact_resnet8",
    "preact_resnet18",
    "read_state_dict",
]

BLOCK_NAMES = ("stem", "layer1", "layer2", "layer3", "layer4")
# Prefixes that wrappers (DataParallel, Lightning, timm/our own grid model) put before
# the trunk's own names; stripped when matching a file's tensors to the network.
_PREFIXES = ("module.", "model.", "trunk.", "backbone.", "encoder.", "features.")


class WeightsError(ValueError):
    """A weights file cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus the shortcut.

    When the block changes stride or width, the shortcut is a 1x1 convolution of the
    pre-activated input (as in He et al.'s pre-activation design).
    """

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Conv2d(in_channels, channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet trunk: (N, 3, h, w) images -> (N, features) pooled features.

    Args:
        blocks: residual blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
        widths: channels per stage, e.g. (64, 128, 256, 512).
        stem_channels: channels of the 7x7 stride-2 stem convolution.
        stem_pool: max-pool (3x3, stride 2) after the stem, as in ImageNet ResNets.
    """

    def __init__(
        self,
        blocks: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        stem_channels: int = 64,
        stem_pool: bool = True,
    ):
        super().__init__()
        if len(blocks) != len(widths) or not blocks:
            raise ValueError("blocks and widths need one entry per stage")
        stem: list[nn.Module] = [nn.Conv2d(3, stem_channels, 7, 2, 3, bias=False)]
        if stem_pool:
            stem.append(nn.MaxPool2d(3, 2, 1))
        self.stem = nn.Sequential(*stem)
        channels = stem_channels
        self.stage_names: list[str] = []
        for i, (count, width) in enumerate(zip(blocks, widths, strict=True)):
            layers = []
            for j in range(count):
                stride = 2 if (j == 0 and i > 0) else 1
                layers.append(PreActBlock(channels, width, stride))
                channels = width
            name = f"layer{i + 1}"
            setattr(self, name, nn.Sequential(*layers))
            self.stage_names.append(name)
        # Pre-activation nets end with a BN-ReLU before pooling (the last block's sum is
        # not normalised otherwise).
        self.final_bn = nn.BatchNorm2d(channels)
        self.n_features = channels
        self.reset_parameters()

    @property
    def block_names(self) -> tuple[str, ...]:
        """Names of the trunk's stages in order: ``stem``, ``layer1``, ..."""
        return ("stem", *self.stage_names)

    def reset_parameters(self) -> None:
        """He (Kaiming normal, fan-out) initialisation for convolutions; BN weight 1, bias 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def stages(self) -> list[tuple[str, nn.Module]]:
        """The stem and each stage with its name, in order."""
        return [(name, getattr(self, name)) for name in self.block_names]

    def head_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final BN-ReLU and global average pooling: (N, C, h, w) -> (N, C)."""
        return torch.relu(self.final_bn(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _, stage in self.stages():
            x = stage(x)
        return self.head_features(x)


def preact_resnet18(**kwargs) -> PreActResNet:
    """Pre-activation ResNet-18 trunk, 512 pooled features per image."""
    return PreActResNet((2, 2, 2, 2), (64, 128, 256, 512), **kwargs)


def preact_resnet8(width: int = 32, **kwargs) -> PreActResNet:
    """Small pre-activation ResNet-8 (stem, three one-block stages of ``width`` channels).

    The tile feature network of attention sampling (Katharopoulos & Fleuret 2019), which
    the dual-attention paper reuses: "a residual network with 8 layers and 32 channels"
    (1 stem convolution + 3 blocks x 2 convolutions + the classifier's linear layer).
    """
    kwargs.setdefault("stem_channels", width)
    return PreActResNet((1, 1, 1), (width, width, width), **kwargs)


@dataclass
class WeightsReport:
    """Which tensors of a weights file went into a network.

    Attributes:
        path: the file.
        loaded: network tensors that were set from the file.
        missing: network tensors the file did not provide (left as initialised).
        unexpected: file tensors that match nothing in the network (ignored).
        mismatched: file tensors whose shape differs from the network's (ignored),
            as ``name: file shape vs network shape``.
    """

    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A few lines for a log or the GUI: counts and the first names of each kind."""
        lines = [f"{self.path}: loaded {len(self.loaded)} tensors"]
        for name in ("missing", "unexpected", "mismatched"):
            values = getattr(self, name)
            if values:
                shown = ", ".join(values[:6]) + (" ..." if len(values) > 6 else "")
                lines.append(f"  {len(values)} {name}: {shown}")
        return "\n".join(lines)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a local weights file, without unpickling any code.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)``, taking ``state_dict``/``model`` from a
    checkpoint dictionary when the tensors sit under one of those keys.

    Raises:
        WeightsError: the file is missing, unreadable or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(path, "no such file" if not path.exists() else "not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refusals, truncation and format errors vary
        # torch's refusal is a page of advice; keep the line that says what was refused
        detail = _first_line(exc, containing="Unsupported")
        if isinstance(exc, pickle.UnpicklingError) and "Unsupported global" in detail:
            raise WeightsError(
                path,
                "holds pickled Python objects besides tensors; refused, since unpickling "
                f"them could run code ({detail})",
            ) from exc
        raise WeightsError(path, f"cannot read weights ({type(exc).__name__}: {detail})") from exc
    if isinstance(state, Mapping):
        for key in ("state_dict", "model", "model_state_dict", "weights"):
            inner = state.get(key)
            if isinstance(inner, Mapping):
                state = inner
                break
    if not isinstance(state, Mapping):
        raise WeightsError(path, f"holds a {type(state).__name__}, not a dictionary of tensors")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(path, "holds no tensors")
    return tensors


def _first_line(exc: BaseException, containing: str = "") -> str:
    """One line of an exception's message (some, like EOFError on an empty file, have none)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if containing and containing in line:
            return line
    return lines[0] if lines else "no message"


def _canonical(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                changed = True
    # torchvision-style names for the stem; our stem is a Sequential
    if name.startswith("conv1.") and "." not in name[len("conv1.") :]:
        name = "stem.0." + name[len("conv1.") :]
    if name.startswith("bn."):  # the final BN of pre-activation nets
        name = "final_" + name
    return name.replace("downsample.0.", "shortcut.")


def load_weights(
    model: nn.Module, path: str | os.PathLike, *, strict: bool = False
) -> WeightsReport:
    """Load a local weights file into ``model`` by tensor name; report what loaded.

    Names are matched after removing wrapper prefixes (``module.``, ``trunk.`` ...).
    Tensors of the wrong shape are skipped and reported, never broadcast. A classifier
    layer in the file (``fc.*``) is reported as unexpected, since the trunk has none.

    Args:
        model: the network (e.g. a ``PreActResNet``).
        path: ``.safetensors`` or a torch state-dict file.
        strict: raise WeightsError unless every network tensor was loaded.

    Returns:
        The report of loaded, missing, unexpected and mismatched tensors.

    Raises:
        WeightsError: unreadable file, nothing matched, or (strict) tensors missing.
    """
    tensors = read_state_dict(path)
    own = model.state_dict()
    report = WeightsReport(str(path))
    update: dict[str, torch.Tensor] = {}
    for raw_name, tensor in tensors.items():
        name = raw_name if raw_name in own else _canonical(raw_name)
        if name not in own:
            report.unexpected.append(raw_name)
        elif tuple(own[name].shape) != tuple(tensor.shape):
            report.mismatched.append(
                f"{raw_name}: {tuple(tensor.shape)} vs {tuple(own[name].shape)}"
            )
        else:
            update[name] = tensor.to(own[name].dtype)
    if not update:
        raise WeightsError(
            path,
            f"none of its {len(tensors)} tensors match the network (first names: "
            f"{', '.join(list(tensors)[:3])})",
        )
    report.loaded = sorted(update)
    report.missing = sorted(set(own) - set(update))
    if strict and report.missing:
        raise WeightsError(
            path, f"{len(report.missing)} network tensors missing: {', '.join(report.missing[:5])}"
        )
    model.load_state_dict(update, strict=False)
    return report
