"""Grid attention (Tomita et al. 2019): a whole-slide classifier with m attention maps.

A tissue piece is cut into an H' x W' grid of non-overlapping tiles. Each tile goes
through a pre-activation ResNet-18 (global pooled: 512 features), which gives the
feature grid U (512, H', W'). m filters of 512 x d x d (the paper's 3-D convolution
of depth 512, i.e. ``Conv2d(512, m, d, padding=d // 2)`` on U) give the raw scores
V (m, H', W'); a softmax over the tissue positions of each map (Eq. 1; non-tissue
positions are masked out, our decision) gives the attention maps; each map weights U
into one 512-vector (Eq. 2); the m vectors are concatenated, dropped out (p = 0.5) and
a fully connected layer gives the class scores.

Memory (our decision, PAPERS.md §1): only the last ``trainable_blocks`` stages of the
trunk train. ``train_step`` runs the tiles twice, in chunks: first without autograd to
build U (keeping only 512 numbers per tile), then, once the loss has given dL/dU, the
trainable stages again per chunk with autograd, back-propagating each chunk's slice
of dL/dU. That is activation checkpointing with the tile source as the checkpoint, so
a step's memory grows with H'·W'·512, not with pixels. The caller's ``chunks`` must
therefore give the same tiles in the same order each time it is called.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .device import Autocast, model_device
from .tile_network import (
    MAX_INPUT_PX,
    MAX_TILE_UM,
    MAX_WIDTH,
    MIN_TILE_UM,
    ModelConfig,
    TileNetwork,
    check_range,
)

__all__ = [
    "GridAttention",
    "GridAttentionConfig",
    "GridOutput",
    "StepResult",
    "cells_to_grid",
]

MODEL_KIND = "grid-attention"
# Bounds on the head's sizes (the paper: 64 maps of 3 x 3, no hidden layer).
MAX_MAPS = 1024
MAX_KERNEL = 15
MAX_HIDDEN_LAYERS = 8


@dataclass
class GridAttentionConfig(ModelConfig):
    """Sizes and settings of a grid-attention model (saved with every checkpoint).

    Attributes:
        classes: class names, in the order of the model's outputs.
        risk_order: class indices from lowest to highest risk, for the paper's rule that a
            slide takes the highest-risk class among its pieces; empty = the order of
            ``classes``.
        n_maps: m, the number of attention maps.
        kernel: d, the attention filters' height and width (padding d // 2).
        dropout: dropout before the classifier.
        hidden: widths of hidden fully connected layers (ReLU) before the output layer;
            empty = one fully connected layer, as the paper.
        trainable_blocks: how many of the trunk's last stages train (1 = ``layer4``, the
            paper; 0 = the trunk is frozen; 5 = everything, stem included).
        tile_um: tile edge in micrometres at the slide (492 px at 20x = 246 µm in the paper).
        input_px: tile edge fed to the trunk (tiles are resized; 224 in the paper).
        mean, std: per-channel normalisation of pixels scaled to [0, 1] (cohort statistics).
    """

    classes: tuple[str, ...]
    risk_order: tuple[int, ...] = ()
    n_maps: int = 64
    kernel: int = 3
    dropout: float = 0.5
    hidden: tuple[int, ...] = ()
    trainable_blocks: int = 1
    tile_um: float = 246.0
    input_px: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    kind: str = field(default=MODEL_KIND, init=False)

    def __post_init__(self) -> None:
        self._check_classes()
        self.hidden = tuple(int(h) for h in self.hidden)
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        if self.n_maps < 1 or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError("n_maps must be >= 1 and kernel a positive odd number")
        check_range("n_maps", self.n_maps, 1, MAX_MAPS)
        check_range("kernel", self.kernel, 1, MAX_KERNEL)
        if len(self.hidden) > MAX_HIDDEN_LAYERS:
            raise ValueError(f"hidden must have at most {MAX_HIDDEN_LAYERS} layers")
        for width in self.hidden:
            check_range("hidden", width, 1, MAX_WIDTH)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.trainable_blocks <= 5:
            raise ValueError(f"trainable_blocks must be 0..5, got {self.trainable_blocks}")
        if self.tile_um <= 0 or self.input_px < 16:
            raise ValueError("tile_um must be positive and input_px at least 16")
        check_range("tile_um", self.tile_um, MIN_TILE_UM, MAX_TILE_UM)
        check_range("input_px", self.input_px, 16, MAX_INPUT_PX)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need 3 values, std positive")


@dataclass
class GridOutput:
    """What the model gives for one grid.

    Attributes:
        logits: (C,) class scores.
        maps: (m, H', W') attention maps (softmax over tissue positions; 0 elsewhere).
        scores: (m, H', W') raw scores V (-inf at non-tissue positions).
        features: (N, 512) per-tile features, in the order of the cells.
    """

    logits: torch.Tensor
    maps: torch.Tensor
    scores: torch.Tensor
    features: torch.Tensor


@dataclass
class StepResult:
    """One training step on one grid: loss (already scaled) and the model's output."""

    loss: float
    logits: torch.Tensor


def cells_to_grid(
    features: torch.Tensor, cells: torch.Tensor, grid_shape: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter per-tile features into the grid: U (1, F, H', W') and tissue (1, H', W').

    Args:
        features: (N, F) features of the tiles.
        cells: (N,) flat grid positions (row * W' + column) of the tiles.
        grid_shape: (H', W').
    """
    height, width = grid_shape
    _n, n_features = features.shape
    flat = features.new_zeros(height * width, n_features)
    flat = flat.index_copy(0, cells, features)  # differentiable w.r.t. features
    u = flat.t().reshape(1, n_features, height, width)  # (1, F, H', W')
    tissue = torch.zeros(height * width, dtype=torch.bool, device=features.device)
    tissue[cells] = True
    return u, tissue.reshape(1, height, width)


class GridAttention(TileNetwork):
    """Tomita et al.'s grid-attention classifier: trunk, m attention maps, classifier.

    Args:
        config: sizes and settings.
    """

    def __init__(self, config: GridAttentionConfig):
        super().__init__(config)
        n_features = self.trunk.n_features
        self.attention = nn.Conv2d(
            n_features, config.n_maps, config.kernel, padding=config.kernel // 2
        )
        self.dropout = nn.Dropout(config.dropout)
        layers: list[nn.Module] = []
        width = config.n_maps * n_features
        for hidden in config.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            width = hidden
        layers.append(nn.Linear(width, len(config.classes)))
        self.classifier = nn.Sequential(*layers)
        self._finish_init()

    # -- set-up --------------------------------------------------------------------------
    def reset_head(self) -> None:
        """The paper's initialisation of the head: He for the attention convolution,
        Glorot for the fully connected layers, zero biases (the trunk is He-initialised)."""
        nn.init.kaiming_normal_(self.attention.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.attention.bias)
        for module in self.classifier:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    # -- grid -> classes -----------------------------------------------------------------
    def attend(self, u: torch.Tensor, tissue: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Attention and classification on a feature grid.

        Args:
            u: (B, 512, H', W') feature grids, zero at non-tissue positions.
            tissue: (B, H', W') bool, the positions that hold tissue tiles.

        Returns:
            logits (B, C), maps (B, m, H', W'), scores V (B, m, H', W'; -inf off tissue).
        """
        if not bool(tissue.flatten(1).any(1).all()):
            raise ValueError("a grid has no tissue positions; nothing to attend to")
        u = u.float()
        v = self.attention(u)  # (B, m, H', W')
        v = v.masked_fill(~tissue[:, None], float("-inf"))
        alpha = torch.softmax(v.flatten(2), dim=-1)  # (B, m, H'·W'), Eq. (1)
        z = torch.bmm(alpha, u.flatten(2).transpose(1, 2))  # (B, m, 512), Eq. (2)
        logits = self.classifier(self.dropout(z.flatten(1)))  # (B, C)
        return logits, alpha.view_as(v), v

    def map_contributions(self, u: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """(B, C, m): how much each map's weighted vector adds to each class score.

        With the paper's single fully connected layer the class score is a sum over maps,
        logit_c = b_c + sum_k W[c, k] . z_k, so W[c, k] . z_k says which maps drove a
        prediction (used to order maps in the viewer and to check localisation).

        Args:
            u: (B, 512, H', W') feature grids.
            maps: (B, m, H', W') attention maps.
        """
        if self.config.hidden:
            raise ValueError("map contributions need the single-layer classifier (hidden=())")
        z = torch.bmm(maps.flatten(2).float(), u.flatten(2).float().transpose(1, 2))  # (B, m, F)
        weight = self.classifier[-1].weight  # (C, m·F)
        n_classes = weight.shape[0]
        weight = weight.view(n_classes, self.config.n_maps, -1)  # (C, m, F)
        return torch.einsum("cmf,bmf->bcm", weight, z)

    def forward(
        self, tiles: torch.Tensor, cells: torch.Tensor, grid_shape: tuple[int, int]
    ) -> GridOutput:
        """The whole model on one grid whose tiles fit in memory at once (tests, tiny grids).

        Args:
            tiles: (N, h, w, 3) uint8 or (N, 3, h, w) float tiles of the tissue cells.
            cells: (N,) flat grid positions of the tiles.
            grid_shape: (H', W').
        """
        features = self.embed(tiles)
        u, tissue = cells_to_grid(features, cells.to(features.device), grid_shape)
        logits, maps, scores = self.attend(u, tissue)
        return GridOutput(logits[0], maps[0], scores[0], features)

    # -- chunked passes ------------------------------------------------------------------
    def embed_chunks(
        self,
        chunks: Iterable[torch.Tensor],
        device: torch.device,
        autocast: Autocast,
        frozen: bool = False,
    ) -> Iterator[torch.Tensor]:
        """(n, 512) float32 features of each chunk of tiles, chunk by chunk (no autograd
        graph is kept only when the caller runs it under ``torch.no_grad``).

        Args:
            chunks: raw tiles (uint8 NHWC), or the frozen stages' output when ``frozen``.
            device: where to compute.
            autocast: the precision policy.
            frozen: see ``predict_chunks``.
        """
        for x in chunks:
            with autocast():
                if frozen:
                    x = x.to(device, non_blocking=True)
                else:
                    x = self.frozen_features(self.prepare_on(x, device))
                features = self.trainable_features(x)
            yield features.float()

    @torch.no_grad()
    def predict_chunks(
        self,
        chunks: Iterable[torch.Tensor],
        cells: torch.Tensor,
        grid_shape: tuple[int, int],
        *,
        device: torch.device | str | None = None,
        amp: bool | None = None,
        frozen: bool = False,
    ) -> GridOutput:
        """Inference on a grid whose tiles arrive in chunks; memory: one chunk + U.

        Args:
            chunks: tiles in the order of ``cells``, in chunks.
            cells: (N,) flat grid positions.
            grid_shape: (H', W').
            device: where to compute (default: where the model is).
            amp: autocast; None = ``default_amp`` (CUDA, CPUs with native bf16).
            frozen: the chunks hold the frozen stages' output for the tiles
                (``frozen_features(prepare_on(tiles))``), which stays valid while those
                stages do not change: validation during training re-uses it each epoch.
        """
        device = torch.device(device) if device is not None else model_device(self)
        autocast = Autocast(device, amp)
        features = torch.cat(list(self.embed_chunks(chunks, device, autocast, frozen)))
        return self.attend_features(features, cells, grid_shape)

    @torch.no_grad()
    def attend_features(
        self, features: torch.Tensor, cells: torch.Tensor, grid_shape: tuple[int, int]
    ) -> GridOutput:
        """The attention and the class scores of a grid whose tiles are embedded.

        Args:
            features: (N, 512) tile features in the order of ``cells``.
            cells: (N,) flat grid positions.
            grid_shape: (H', W').
        """
        u, tissue = cells_to_grid(features, cells.to(features.device), grid_shape)
        logits, maps, scores = self.attend(u, tissue)
        return GridOutput(logits[0], maps[0], scores[0], features)

    def train_step(
        self,
        chunks: Callable[[], Iterable[torch.Tensor]],
        cells: torch.Tensor,
        grid_shape: tuple[int, int],
        target: int,
        *,
        loss_scale: float = 1.0,
        class_weights: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        amp: bool | None = None,
        cache_bytes: int = 0,
    ) -> StepResult:
        """Accumulate the gradients of one grid's cross-entropy loss (no optimiser step).

        Pass 1 embeds every chunk (BN of trainable stages in train mode, updating running
        statistics once); the head's backward then gives dL/dU; pass 2 re-embeds each
        chunk with autograd and back-propagates its slice of dL/dU (BN statistics frozen,
        so both passes compute the same features). While the tensors autograd saves for
        the trainable stages fit in ``cache_bytes``, pass 1 keeps its graph and the
        backward runs through it directly: a grid that fits needs no pass 2.

        Args:
            chunks: called once or twice; each call yields the same tiles, same order.
            cells: (N,) flat grid positions of the tiles.
            grid_shape: (H', W').
            target: the grid's class index.
            loss_scale: multiplies the loss (1 / slides per optimiser step).
            class_weights: (C,) cross-entropy class weights.
            device: where to compute (default: where the model is).
            amp: autocast as in ``predict_chunks``.
            cache_bytes: memory pass 1 may keep to save work: its autograd graph while
                that fits (no pass 2), else the frozen stages' output while that fits
                (pass 2 without recomputing or re-reading them); 0 = neither.
        """
        device = torch.device(device) if device is not None else model_device(self)
        autocast = Autocast(device, amp)
        trainable = self.config.trainable_blocks > 0
        cache: list[torch.Tensor] | None = [] if (trainable and cache_bytes > 0) else None
        graph = _SavedBytes(cache_bytes) if cache is not None else None
        cached = 0
        parts = []
        with torch.no_grad():
            for tiles in chunks():
                with autocast():
                    h = self.frozen_features(self.prepare_on(tiles, device))
                    if graph is not None and graph.fits:
                        with torch.enable_grad(), graph:
                            out = self.trainable_features(h).float()
                        if not graph.fits:  # over budget: from here on, two passes
                            parts = [p.detach() for p in parts]
                            out = out.detach()
                    else:
                        out = self.trainable_features(h).float()
                parts.append(out)
                if cache is not None:
                    cached += h.numel() * h.element_size()
                    if cached <= cache_bytes:
                        cache.append(h)
                    else:
                        cache = None
        one_pass = graph is not None and graph.fits
        features = torch.cat(parts)
        if not one_pass:
            features.requires_grad_(trainable)
        del parts
        u, tissue = cells_to_grid(features, cells.to(device), grid_shape)
        logits, _, _ = self.attend(u, tissue)
        weight = class_weights.to(device) if class_weights is not None else None
        loss = F.cross_entropy(
            logits, torch.tensor([int(target)], device=device), weight=weight
        ) * float(loss_scale)
        loss.backward()
        if trainable and not one_pass:
            grad = features.grad
            start = 0
            with _frozen_batchnorm_stats([*self.trainable_stages, self.trunk.final_bn]):
                source = cache if cache is not None else self.frozen_chunks(chunks, device, amp)
                for h in source:
                    with autocast():
                        out = self.trainable_features(h).float()
                    n = out.shape[0]
                    out.backward(grad[start : start + n])
                    start += n
            if start != grad.shape[0]:
                raise RuntimeError(
                    f"the tile chunks changed between passes ({grad.shape[0]} tiles, then "
                    f"{start}); chunks() must give the same tiles each time"
                )
        return StepResult(float(loss.detach()), logits.detach()[0])

    def frozen_chunks(
        self,
        chunks: Callable[[], Iterable[torch.Tensor]],
        device: torch.device,
        amp: bool | None = None,
    ) -> Iterator[torch.Tensor]:
        """The frozen stages' output for each chunk of tiles (no autograd)."""
        autocast = Autocast(device, amp)
        for tiles in chunks():
            with autocast():
                yield self.frozen_features(self.prepare_on(tiles, device))


class _SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes autograd saves for backward inside the block, parameters aside;
    ``fits`` stays true while the total is within ``budget`` (tensors that share storage
    count twice, so the count errs high)."""

    def __init__(self, budget: int):
        self.budget = budget
        self.saved = 0
        super().__init__(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if not (t.is_leaf and t.requires_grad):  # parameters are kept anyway
            self.saved += t.numel() * t.element_size()
        return t

    @property
    def fits(self) -> bool:
        return self.saved <= self.budget


@contextlib.contextmanager
def _frozen_batchnorm_stats(modules: Sequence[nn.Module]):
    """Batch statistics without updating running statistics (momentum 0) inside the block."""
    bns = [m for mod in modules for m in mod.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        if m.training:
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in saved:
            m.momentum = momentum
