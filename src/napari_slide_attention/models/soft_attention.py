"""Soft attention model (SAM) of the dual attention model (Raza et al., Sec. III-A, III-C).

A small CNN looks at a low-resolution view of the slide (×32 down, 2.5x in the paper)
and gives an attention map A: a probability distribution over the cells of a coarse
grid (Eq. 1, 2). The feature extractor f_e is ``layers`` convolutions with ReLU whose
channels start at ``channels`` and double each layer (4 layers for HER2, 5 for MMR;
8 channels first), followed by a max-pooling of kernel and stride ``pool`` "to reduce
the size of the sampling space" (8 for HER2). f_a is a 1×1 convolution to one logit per
cell; a softmax over the tissue cells turns the logits into A (non-tissue cells get
exactly 0: our decision, as for grid attention in PAPERS.md §1).

The entropy regulariser L_SA (Eq. 3) is ``entropy_loss``: minimising it spreads the
attention (see its docstring for the sign).

Our decisions where the paper is silent:
- The grid is the ceiling of the input size over ``pool`` (PyTorch's ``ceil_mode``):
  the last row and column of cells may cover fewer input pixels, so no tissue at the
  right or bottom edge of the slide is dropped.
- A grid cell is tissue when at least ``min_tissue`` (default 0.5: most) of its input
  pixels inside the image are tissue. Cells with a sliver of tissue would otherwise
  send tiles mostly over background.
- f_a starts at zero, so an untrained model attends uniformly over the tissue (the
  random-sampling baseline's distribution) rather than to an arbitrary pattern.

Sharper attention for sparse lesions (our extension, PAPERS.md §2; off by default, so the
paper's model is unchanged): ``temperature`` T divides the logits before the softmax
(T < 1 sharpens A), and ``top_k`` keeps only the k largest cells of A, renormalised, so
the expectation over A the soft attention learns from is pooled over k cells and A is
exactly 0 elsewhere (``sharpen``). Both are part of the config, so a checkpoint carries
them and inference samples tiles from the same A the model was trained with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .tile_network import MAX_WIDTH, check_field_types, check_range

__all__ = [
    "SoftAttention",
    "SoftAttentionConfig",
    "SoftAttentionOutput",
    "attention_entropy",
    "entropy_loss",
    "pool_tissue",
    "sharpen",
    "tissue_softmax",
]


# Pixels of a view the soft attention's feature network holds at once with 8 channels
# (``cell_logits``; fewer with more): 4 M pixels, 128 MiB of float32 features a layer.
STRIP_PIXELS = 1 << 22


@dataclass
class SoftAttentionConfig:
    """Sizes and settings of the soft attention model (paper's HER2 values by default).

    Attributes:
        in_channels: channels of the low-resolution input (3 for RGB).
        layers: number of convolution + ReLU layers of f_e (4 for HER2, 5 for MMR).
        channels: output channels of the first layer; each further layer doubles them.
        kernel: convolution height and width (odd; padding kernel // 2 keeps the size).
        pool: max-pooling kernel and stride after the convolutions (8 for HER2, 3 for
            MMR); one attention cell covers ``pool`` × ``pool`` input pixels.
        min_tissue: a cell is tissue when at least this fraction of its input pixels are.
        entropy_weight: β of the entropy regulariser L_SA (1 in the paper).
        temperature: T of the softmax, A = softmax(logits / T) over the tissue (1: the
            paper; below 1 sharpens A). Our extension for sparse lesions.
        top_k: keep only the k most attended tissue cells of A, renormalised (0: all
            cells, the paper). Our extension for sparse lesions.
        mean, std: per-channel normalisation of pixels scaled to [0, 1]. The defaults
            (0.5, 0.25) are neutral values that centre [0, 1] near zero; replace them
            with cohort statistics when known.
    """

    in_channels: int = 3
    layers: int = 4
    channels: int = 8
    kernel: int = 3
    pool: int = 8
    min_tissue: float = 0.5
    entropy_weight: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)

    def __post_init__(self) -> None:
        check_field_types(self)
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if self.layers < 1:
            raise ValueError(f"layers must be >= 1, got {self.layers}")
        if self.channels < 1:
            raise ValueError(f"channels must be >= 1, got {self.channels}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd number, got {self.kernel}")
        if self.pool < 1:
            raise ValueError(f"pool must be >= 1, got {self.pool}")
        if not 0 < self.min_tissue <= 1:
            raise ValueError(f"min_tissue must be in (0, 1], got {self.min_tissue}")
        if not (math.isfinite(self.entropy_weight) and self.entropy_weight >= 0):
            raise ValueError(f"entropy_weight must be finite and >= 0, got {self.entropy_weight}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")
        if isinstance(self.top_k, bool) or int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"top_k must be a whole number >= 0 (0: off), got {self.top_k}")
        self.top_k = int(self.top_k)
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(
                f"mean and std need one value per input channel ({self.in_channels}), "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {list(self.std)}")
        check_range("in_channels", self.in_channels, 1, 16)
        check_range("layers", self.layers, 1, 16)
        check_range("kernel", self.kernel, 1, 15)
        check_range("pool", self.pool, 1, 1024)
        check_range("top_k", self.top_k, 0, 10**6)
        # the last layer has channels * 2^(layers - 1) channels
        if self.channels * 2 ** (self.layers - 1) > MAX_WIDTH:
            raise ValueError(
                f"channels * 2^(layers - 1) must be at most {MAX_WIDTH}, got channels "
                f"{self.channels} and layers {self.layers}"
            )


@dataclass(frozen=True)
class SoftAttentionOutput:
    """What the soft attention model gives for a batch of low-resolution views.

    Attributes:
        attention: (B, h', w') A, probabilities over the tissue cells of each image
            (sum 1 per image; exactly 0 outside tissue).
        logits: (B, h', w') the raw scores of f_a before masking and softmax.
        tissue: (B, h', w') bool, the cells that count as tissue.
    """

    attention: torch.Tensor
    logits: torch.Tensor
    tissue: torch.Tensor


def pool_tissue(tissue: torch.Tensor, pool: int, min_tissue: float = 0.5) -> torch.Tensor:
    """The tissue mask on the attention grid: (B, ceil(h / pool), ceil(w / pool)) bool.

    A cell is tissue when at least ``min_tissue`` of its input pixels that lie inside
    the image are tissue (the last row and column of cells may be partial).

    Args:
        tissue: (B, h, w) bool tissue mask at the input resolution.
        pool: cell edge in input pixels.
        min_tissue: fraction of a cell's pixels that must be tissue, in (0, 1].
    """
    if tissue.ndim != 3:
        raise ValueError(f"tissue must be (B, h, w), got shape {tuple(tissue.shape)}")
    batch, height, width = tissue.shape
    rows, cols = math.ceil(height / pool), math.ceil(width / pool)
    pad = (0, cols * pool - width, 0, rows * pool - height)
    # One byte per pixel: a 6,250 px view's mask in floats would take 156 MB a copy.
    counts = F.pad(tissue.to(torch.uint8), pad)  # (B, h'·pool, w'·pool); padding: no tissue
    counts = counts.reshape(batch, rows, pool, cols, pool).sum(dim=(2, 4), dtype=torch.int32)
    # pixels of each cell inside the image: pool², less at the last row and column
    tall = torch.full((rows,), pool, dtype=torch.int32, device=tissue.device)
    wide = torch.full((cols,), pool, dtype=torch.int32, device=tissue.device)
    tall[-1], wide[-1] = height - (rows - 1) * pool, width - (cols - 1) * pool
    inside = tall[:, None] * wide[None, :]  # (h', w')
    return counts >= min_tissue * inside  # (B, h', w')


def tissue_softmax(logits: torch.Tensor, tissue: torch.Tensor) -> torch.Tensor:
    """Softmax over the tissue cells of each map: (B, h', w'), exactly 0 off tissue.

    Args:
        logits: (B, h', w') scores.
        tissue: (B, h', w') bool; every map needs at least one tissue cell.
    """
    if logits.shape != tissue.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and tissue {tuple(tissue.shape)} differ in shape"
        )
    empty = ~tissue.flatten(1).any(1)
    if bool(empty.any()):
        which = empty.nonzero().flatten().tolist()
        raise ValueError(f"no tissue cell on the attention grid of image(s) {which}")
    masked = logits.masked_fill(~tissue, float("-inf")).flatten(1)  # (B, h'·w')
    # softmax subtracts the row maximum (a finite tissue logit), so large logits are safe
    return torch.softmax(masked, dim=1).reshape(logits.shape)


def sharpen(
    logits: torch.Tensor,
    tissue: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    explore: torch.Generator | None = None,
) -> torch.Tensor:
    """A sharpened by a temperature and a top-k: (B, h', w'), exactly 0 off the kept cells.

    A = softmax(logits / T) over the tissue cells; with ``top_k`` = k > 0 only the k most
    attended tissue cells keep their probability, renormalised over them (a map with
    fewer tissue cells keeps them all). Ties go to the first cell in row-major order.
    With T = 1 and k = 0 this is ``tissue_softmax`` (the paper's A), bit for bit.

    Args:
        logits: (B, h', w') scores.
        tissue: (B, h', w') bool; every map needs at least one tissue cell.
        temperature: T > 0.
        top_k: cells kept (0: all).
        explore: with ``top_k``, draw the k cells from A without replacement (Gumbel-top-k,
            noise from this CPU generator) instead of taking the k largest, so that cells
            outside the current top k are tried too (training).
    """
    if temperature == 1.0 and not top_k:
        return tissue_softmax(logits, tissue)
    scaled = logits / temperature
    if not top_k:
        return tissue_softmax(scaled, tissue)
    keys = scaled.flatten(1)  # (B, P)
    if explore is not None:
        draws = torch.empty(keys.shape, dtype=torch.float32).exponential_(generator=explore)
        keys = keys - torch.log(draws.clamp_min(torch.finfo(draws.dtype).tiny)).to(keys)
    flat_tissue = tissue.flatten(1)
    keys = keys.masked_fill(~flat_tissue, float("-inf"))
    order = torch.sort(keys.detach(), dim=1, descending=True, stable=True).indices  # (B, P)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    kept = (rank < top_k) & flat_tissue  # (B, P): the k best tissue cells of each map
    return tissue_softmax(scaled, kept.reshape(tissue.shape))


def attention_entropy(attention: torch.Tensor, tissue: torch.Tensor) -> torch.Tensor:
    """The multinomial entropy −Σ a log a of each attention map over its tissue: (B,).

    0 · log 0 = 0, with a zero gradient there, so cells whose probability underflows
    (and non-tissue cells) neither add to the entropy nor produce NaN gradients.

    Args:
        attention: (B, h', w') probabilities.
        tissue: (B, h', w') bool.
    """
    live = tissue & (attention > 0)
    safe = torch.where(live, attention, torch.ones_like(attention))
    terms = torch.where(live, attention * torch.log(safe), torch.zeros_like(attention))
    return -terms.flatten(1).sum(1)


def entropy_loss(
    attention: torch.Tensor, tissue: torch.Tensor, weight: float = 1.0
) -> torch.Tensor:
    """The entropy regulariser L_SA as a loss to minimise: −β · mean entropy (scalar).

    The paper writes L_SA = β·E(A) (Eq. 3) and says it "results in a relatively
    uniform attention distribution" and encourages the model to "explore". Minimising
    +β·E would concentrate the attention instead, so the term added to a loss that is
    minimised is −β·E: lowering it raises the entropy and spreads the attention
    (Katharopoulos & Fleuret's regulariser has the same effect).

    Args:
        attention: (B, h', w') probabilities.
        tissue: (B, h', w') bool.
        weight: β (``SoftAttentionConfig.entropy_weight``).
    """
    return -weight * attention_entropy(attention, tissue).mean()


class SoftAttention(nn.Module):
    """Raza et al.'s soft attention model f_s = f_a ∘ f_e on a low-resolution view.

    Args:
        config: sizes and settings.
    """

    def __init__(self, config: SoftAttentionConfig | None = None):
        super().__init__()
        config = config or SoftAttentionConfig()
        self.config = config
        layers: list[nn.Module] = []
        width = config.in_channels
        for i in range(config.layers):
            out = config.channels * 2**i
            layers += [
                nn.Conv2d(width, out, config.kernel, padding=config.kernel // 2),
                nn.ReLU(inplace=True),
            ]
            width = out
        self.features = nn.Sequential(*layers)  # f_e before pooling
        self.pool = nn.MaxPool2d(config.pool, stride=config.pool, ceil_mode=True)
        self.score = nn.Conv2d(width, 1, 1)  # f_a: one attention logit per cell
        self.register_buffer("mean", torch.tensor(config.mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(config.std).view(1, -1, 1, 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He initialisation for f_e, zeros for f_a (uniform attention before training)."""
        for module in self.features:
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    @property
    def cell_size(self) -> int:
        """Edge of one attention cell in input pixels (= ``pool``).

        One cell covers ``cell_size × downsample`` level-0 pixels when the input is the
        slide ``downsample`` times down (32 × 8 = 256 in the paper's HER2 setting).
        """
        return self.config.pool

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        """The attention grid (h', w') for an input of ``height`` × ``width`` pixels."""
        pool = self.config.pool
        return math.ceil(height / pool), math.ceil(width / pool)

    def forward(
        self,
        image: torch.Tensor,
        tissue: torch.Tensor,
        *,
        explore: torch.Generator | None = None,
    ) -> SoftAttentionOutput:
        """Attention maps of a batch of low-resolution views.

        Args:
            image: (B, C, h, w) pixels as floats in [0, 1] (uint8 is scaled by 1/255).
            tissue: (B, h, w) bool tissue mask at the same resolution.
            explore: with ``top_k``, draw the kept cells from A with this generator
                instead of taking the k largest (see ``sharpen``); ignored without it.

        Returns:
            The attention A, the raw logits and the pooled tissue mask, each (B, h', w')
            with (h', w') = ``grid_shape(h, w)``.

        Raises:
            ValueError: on mismatched shapes, or when an image has no tissue cell.
        """
        if image.ndim != 4 or image.shape[1] != self.config.in_channels:
            raise ValueError(
                f"image must be (B, {self.config.in_channels}, h, w), "
                f"got shape {tuple(image.shape)}"
            )
        batch, _c, height, width = image.shape
        if tuple(tissue.shape) != (batch, height, width):
            raise ValueError(
                f"tissue must be (B, h, w) = {(batch, height, width)}, "
                f"got shape {tuple(tissue.shape)}"
            )
        logits = self.cell_logits(image)  # (B, h', w')
        cells = pool_tissue(tissue.bool(), self.config.pool, self.config.min_tissue)
        c = self.config
        attention = sharpen(logits, cells, c.temperature, c.top_k, explore)  # (B, h', w')
        return SoftAttentionOutput(attention=attention, logits=logits, tissue=cells)

    def cell_logits(self, image: torch.Tensor, strip_pixels: int = STRIP_PIXELS) -> torch.Tensor:
        """Returns the attention logits (B, h', w') of views (B, C, h, w), uint8 or floats
        in [0, 1], computed in strips of rows of about ``strip_pixels`` pixels each.

        A strip is a whole number of attention cells high and carries a halo of the
        convolutions' reach above and below, so every cell sees the pixels it sees on the
        whole view: the logits are those of one pass, while memory holds one strip's
        feature maps instead of the whole view's (a 6,250 px view of a 200,000 px slide
        would need 1.25 GB for its first layer alone).
        """
        c = self.config
        height, width = image.shape[-2:]
        halo = c.layers * (c.kernel // 2)  # rows a cell's receptive field reaches past it
        # the widest feature map has channels·2^(layers-1) channels, two alive at a time
        pixels = strip_pixels // (c.channels * 2 ** (c.layers - 1) // 8 or 1)
        rows = max(c.pool, pixels // max(1, width * image.shape[0]) // c.pool * c.pool)
        parts = []
        for top in range(0, height, rows):
            bottom = min(height, top + rows)
            lo, hi = max(0, top - halo), min(height, bottom + halo)
            x = image[:, :, lo:hi].float()
            if image.dtype == torch.uint8:
                x = x / 255.0
            x = self.features((x - self.mean) / self.std)  # (B, c, hi - lo, w)
            x = self.pool(x[:, :, top - lo : bottom - lo])  # (B, c, strip cells, w')
            parts.append(self.score(x)[:, 0])
        return torch.cat(parts, dim=1)  # (B, h', w')

    def entropy_loss(self, output: SoftAttentionOutput) -> torch.Tensor:
        """L_SA of an output with this model's β (see the module function)."""
        return entropy_loss(output.attention, output.tissue, self.config.entropy_weight)
