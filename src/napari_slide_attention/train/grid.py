"""Training the grid-attention model on a cohort, with slide (piece) labels only.

``train_grid`` is a generator of ``Progress`` events returning a ``TrainSummary``; the
CLI, the GUI's fine-tune panel (through the CLI, in a separate process) and the tests
drive the same code. Defaults are the paper's (Tomita et al. 2019): Adam, lr 1e-3
multiplied by 0.95 each epoch and reset to 1e-4 every 50 epochs, 200 epochs, two
samples per optimiser step (gradient accumulation: grids differ in size, so no
padding), random rotation and scaling 0.8-1.2, cross-entropy, normalisation by the
cohort's tissue-pixel mean and std. Every value is a setting.

The run directory holds:

``settings.json``              the settings and the cohort it trained on
``checkpoints/epoch-NNNN.safetensors``  the model after each epoch (atomic writes)
``last.safetensors``, ``best.safetensors``  the latest, and the best by validation
                               loss or mean F1 (``select``; training loss without a
                               validation split)
``training-state.safetensors`` weights, optimiser state, epoch, best epoch and log rows
                               in one file, written last: what a resume starts from
``log.csv``, ``log.json``      one row per epoch: loss, lr, validation metrics, time
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from ..inference import aggregate
from ..jobs import Progress
from ..models.device import default_amp, resolve_device
from ..models.grid_attention import GridAttention, GridAttentionConfig
from ..slide.reader import Slide, open_slide
from ..slide.sampling import (
    Augmentation,
    PieceSample,
    piece_tiles,
    read_level_for,
    slide_pieces,
    tile_edge_px,
)
from ..slide.tissue import TissueParams, tissue_mask
from .cohort import Cohort
from .loop import (
    RunDirectory,
    SettingsRecord,
    TrainSummary,
    adam,
    class_weights,
    init_settings,
    initialise,
    load_init,
    on_device,
    run_epochs,
)
from .metrics import Metrics, evaluate, slide_log_loss

__all__ = ["GridTrainSettings", "TrainSummary", "evaluate_grid", "train_grid"]


@dataclass
class GridTrainSettings(SettingsRecord):
    """How to train (the paper's values are the defaults).

    Attributes:
        epochs: passes over the training pieces.
        lr: initial learning rate (Adam).
        lr_decay: multiplied into the learning rate after every epoch.
        lr_reset_every: every this many epochs the learning rate is reset ...
        lr_reset: ... to this value.
        weight_decay: Adam weight decay.
        samples_per_step: pieces per optimiser step (gradient accumulation).
        model: the model's settings (``GridAttentionConfig``'s n_maps, kernel, dropout,
            hidden, trainable_blocks, tile_um, input_px); the config's defaults, the
            paper's, fill what is not given.
        min_tissue: tissue fraction a tile needs to be in a grid.
        augment: draw the paper's augmentation for every sample every epoch.
        scale_range: random tile scaling range.
        chunk_tiles: tiles per forward chunk (memory per step: one chunk + the grid).
        cache_mb: memory (MB) that saves recomputation: a step keeps its graph, or the
            frozen trunk's output for its second pass, up to this size; validation keeps
            the frozen trunk's output of its pieces across epochs up to this size again
            (0 = always recompute).
        weights: a local file of pretrained trunk weights (safetensors or a state dict).
        calibrate_bn: estimate the frozen trunk's BN statistics from training tiles
            (None = when no weights were given).
        class_weights: "balanced" (inverse class frequency of the training pieces) or
            "none".
        device: "auto", "cpu", "cuda".
        amp: autocast; None = ``models.device.default_amp``.
        seed: random seed (augmentation, dropout, order).
        normalise_tiles: tiles sampled per training slide for the normalisation statistics.
        aggregation: how pieces make a slide's call in validation.
        select: which epoch is ``best``: "loss", the lowest validation loss (cross-entropy
            of the slides' probabilities; smooth, so a lucky epoch on a small validation
            split is not picked), or "f1", the highest validation mean F1 (the first of
            equals).
        lesion_labels: where the cohort gives lesion boxes, label each piece with the
            highest-risk lesion inside it (the paper); off = every piece takes its slide's
            label (slide labels only).
        max_hours: stop after the epoch that passes this many hours (0 = no limit).
    """

    model_type: ClassVar[type] = GridAttentionConfig

    epochs: int = 200
    lr: float = 1e-3
    lr_decay: float = 0.95
    lr_reset_every: int = 50
    lr_reset: float = 1e-4
    weight_decay: float = 0.0
    samples_per_step: int = 2
    min_tissue: float = 0.5
    augment: bool = True
    scale_range: tuple[float, float] = (0.8, 1.2)
    chunk_tiles: int = 64
    cache_mb: int = 512
    weights: str | None = None
    calibrate_bn: bool | None = None
    class_weights: str = "balanced"
    device: str = "auto"
    amp: bool | None = None
    seed: int = 0
    normalise_tiles: int = 64
    aggregation: str = "highest-risk"
    select: str = "loss"
    lesion_labels: bool = True
    max_hours: float = 0.0
    model: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_model()
        self.scale_range = tuple(float(v) for v in self.scale_range)
        if self.epochs < 1 or self.samples_per_step < 1 or self.chunk_tiles < 1:
            raise ValueError("epochs, samples_per_step and chunk_tiles must be at least 1")
        if self.lr <= 0 or self.lr_reset <= 0 or not 0 < self.lr_decay <= 1:
            raise ValueError("learning rates must be positive and lr_decay in (0, 1]")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must be 0 < low <= high, got {self.scale_range}")
        if self.class_weights not in ("balanced", "none"):
            raise ValueError("class_weights must be 'balanced' or 'none'")
        if self.select not in ("loss", "f1"):
            raise ValueError(f"select must be 'loss' or 'f1', got {self.select!r}")

    def learning_rate(self, epoch: int) -> float:
        """The paper's schedule: lr · decay^e, restarting at lr_reset every N epochs."""
        if self.lr_reset_every > 0 and epoch >= self.lr_reset_every:
            since = epoch % self.lr_reset_every
            return self.lr_reset * self.lr_decay**since
        return self.lr * self.lr_decay**epoch


@dataclass
class _SlideData:
    entry_index: int
    slide: str
    label: int
    pieces: list[PieceSample]
    level: int
    mpp: float | None = None  # the cohort's override of the slide's pixel size


def _prepare(
    cohort: Cohort,
    split: str,
    settings: GridTrainSettings,
    risk: tuple[int, ...],
    tissue: TissueParams | None,
) -> Generator[Progress, None, list[_SlideData]]:
    entries = [(i, e) for i, e in enumerate(cohort.entries) if e.split == split]
    out = []
    for n, (i, entry) in enumerate(entries):
        with open_slide(entry.slide, mpp=entry.mpp) as slide:
            tile_px = tile_edge_px(slide, settings.model["tile_um"])
            level = read_level_for(slide, tile_px, settings.model["input_px"])
            mask = tissue_mask(slide, tissue)
            pieces = slide_pieces(
                slide,
                tile_px,
                min_tissue=settings.min_tissue,
                label=entry.label,
                lesions=entry.lesions or (),
                risk=risk,
                mask=mask,
            )
        if not pieces:
            yield Progress(
                "prepare", n + 1, len(entries), f"{entry.slide.name}: no tissue, skipped"
            )
            continue
        out.append(_SlideData(i, str(entry.slide), entry.label, pieces, level, entry.mpp))
        yield Progress(
            "prepare",
            n + 1,
            len(entries),
            f"{split}: {entry.slide.name}: {len(pieces)} piece(s), "
            f"{sum(p.n_tiles for p in pieces)} tiles",
        )
    return out


def _sample_tiles(data: list[_SlideData], per_slide: int):
    """Up to ``per_slide`` tiles from the first piece of each slide (normalisation, BN)."""
    for item in data:
        with open_slide(item.slide, mpp=item.mpp) as slide:
            for piece in item.pieces[:1]:
                chunks, _, _ = tensor_chunks(slide, piece, item.level, chunk_tiles=per_slide)
                first = next(iter(chunks()))
                yield from first.numpy()


class FrozenCache:
    """The frozen trunk stages' output per tissue piece, kept up to a budget of bytes.

    Validation tiles are not augmented and frozen stages never change, so what they
    compute for a validation piece is the same every epoch; with the cache only the
    trainable stages and the head run again. Pieces are kept whole or not at all, in
    the order they come, until the budget is spent.
    """

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.used = 0
        self.pieces: dict[tuple[str, int], list[torch.Tensor]] = {}

    def chunks(
        self, key: tuple[str, int], compute: Callable[[], Iterable[torch.Tensor]]
    ) -> Iterator[torch.Tensor]:
        """The piece's frozen chunks: from the cache, or from ``compute()`` (kept if they fit)."""
        if key in self.pieces:
            yield from self.pieces[key]
            return
        kept: list[torch.Tensor] | None = []
        size = 0
        for h in compute():
            if kept is not None:
                size += h.numel() * h.element_size()
                if self.used + size <= self.budget:
                    kept.append(h)
                else:
                    kept = None
            yield h
        if kept is not None:
            self.pieces[key] = kept
            self.used += size


def tensor_chunks(
    slide: Slide,
    sample: PieceSample,
    level: int,
    *,
    chunk_tiles: int,
    augmentation: Augmentation | None = None,
) -> tuple[Callable[[], Iterator[torch.Tensor]], torch.Tensor, tuple[int, int]]:
    """A piece's tiles (``slide.sampling.piece_tiles``) as a re-callable source of uint8
    tensors, the (N,) flat cells they fill and the (rotated) grid shape: what
    ``GridAttention.train_step`` and ``predict_chunks`` take."""
    tiles = piece_tiles(slide, sample, level, chunk_tiles=chunk_tiles, augmentation=augmentation)

    def chunks() -> Iterator[torch.Tensor]:
        for batch in tiles:
            yield torch.from_numpy(batch)

    return chunks, torch.from_numpy(tiles.cells), tiles.shape


def evaluate_grid(
    model: GridAttention,
    data: list[_SlideData],
    classes: tuple[str, ...],
    *,
    device: torch.device,
    amp: bool,
    chunk_tiles: int,
    aggregation: str,
    frozen_cache: FrozenCache | None = None,
) -> tuple[Metrics, list[dict[str, Any]]]:
    """Slide-level metrics of ``model`` on prepared slides (no augmentation).

    ``frozen_cache`` keeps the frozen stages' output between calls (the same slides
    each epoch, the frozen stages unchanged).
    """
    model.eval()
    truth, probs, rows = [], [], []
    for item in data:
        with open_slide(item.slide, mpp=item.mpp) as slide:
            piece_probs = []
            for index, piece in enumerate(item.pieces):
                chunks, cells, shape = tensor_chunks(
                    slide, piece, item.level, chunk_tiles=chunk_tiles
                )
                if frozen_cache is None:
                    out = model.predict_chunks(chunks(), cells, shape, device=device, amp=amp)
                else:
                    frozen = frozen_cache.chunks(
                        (item.slide, index),
                        lambda chunks=chunks: model.frozen_chunks(chunks, device, amp),
                    )
                    out = model.predict_chunks(
                        frozen, cells, shape, device=device, amp=amp, frozen=True
                    )
                piece_probs.append(torch.softmax(out.logits.float(), 0).cpu().numpy())
        p, _ = aggregate(piece_probs, aggregation, model.config.risk)
        truth.append(item.label)
        probs.append(p)
        rows.append({"slide": item.slide, "label": item.label, "probabilities": p.tolist()})
    probabilities = np.stack(probs).astype(np.float64)
    probabilities /= probabilities.sum(1, keepdims=True)
    return evaluate(truth, probabilities=probabilities, classes=classes), rows


def slide_loss(rows: list[dict[str, Any]]) -> float:
    """``metrics.slide_log_loss`` of ``evaluate_grid``'s rows."""
    return slide_log_loss([row["label"] for row in rows], [row["probabilities"] for row in rows])


def train_grid(
    cohort: Cohort,
    run_dir: str | os.PathLike,
    settings: GridTrainSettings | None = None,
    *,
    resume: bool = True,
    tissue: TissueParams | None = None,
    init: str | os.PathLike | None = None,
) -> Generator[Progress, None, TrainSummary]:
    """Train a grid-attention model on a cohort's training split.

    Args:
        cohort: slides, labels and splits.
        run_dir: where checkpoints and logs go.
        settings: training settings (the paper's by default).
        resume: continue a run found in ``run_dir`` (its settings must match).
        tissue: tissue detection settings.
        init: start from this grid-attention checkpoint (fine-tuning): its weights,
            normalisation, class names (which must equal the cohort's) and model settings
            (``SettingsRecord.with_model``: the architecture comes from it).

    Yields:
        Progress: "prepare" per slide, "step" per optimiser step (data: loss, lr),
        "epoch" per epoch (data: the log row), "checkpoint".

    Returns:
        The summary with the paths of the best and last checkpoints.
    """
    settings = settings or GridTrainSettings()
    if init is not None:  # the checkpoint decides the model's shape
        settings = init_settings(settings, init)
    classes = cohort.classes
    record = {
        "settings": settings.to_dict(),
        "classes": list(classes),
        "cohort": str(cohort.path) if cohort.path else None,
        "init": str(init) if init else None,
    }
    run = RunDirectory(run_dir, record, resume=resume, settings_type=GridTrainSettings)

    device = resolve_device(settings.device)
    amp = settings.amp if settings.amp is not None else default_amp(device)
    torch.manual_seed(settings.seed)
    config = settings.model_config(classes)
    risk = config.risk

    train = yield from _prepare(cohort, "train", settings, risk, tissue)
    val = yield from _prepare(cohort, "val", settings, risk, tissue)
    if not train:
        raise ValueError("the cohort's training split has no slide with tissue")
    samples = [(s, p) for s in train for p in s.pieces]
    present = sorted({p.label for _, p in samples})
    if len(present) < 2:
        raise ValueError(f"the training pieces hold only class(es) {[classes[c] for c in present]}")

    model = GridAttention(config)
    report = None
    if init is not None:
        load_init(model, init, config.kind, classes)
    else:
        report = yield from initialise(model, settings, train, _sample_tiles, device)
    model = on_device(model, device)

    counts = np.bincount([p.label for _, p in samples], minlength=len(classes)).astype(float)
    weights = class_weights(settings.class_weights, counts)
    optimizer = adam(model, settings)
    yield from run.restore(model, optimizer, settings.epochs)
    steps_per_epoch = math.ceil(len(samples) / settings.samples_per_step)
    cache_bytes = settings.cache_mb << 20
    val_cache = FrozenCache(cache_bytes)

    def train_epoch(
        epoch: int, rng: np.random.Generator, lr: float
    ) -> Generator[Progress, None, dict[str, Any]]:
        """One pass over the training pieces, ``samples_per_step`` per optimiser step."""
        model.train()
        order = rng.permutation(len(samples))
        losses, correct = [], 0
        optimizer.zero_grad(set_to_none=True)
        for k, index in enumerate(order):
            item, piece = samples[index]
            aug = (
                Augmentation.draw(rng, settings.scale_range) if settings.augment else Augmentation()
            )
            sample = piece.augmented(aug, settings.min_tissue)
            with open_slide(item.slide, mpp=item.mpp) as slide:
                chunks, cells, shape = tensor_chunks(
                    slide, sample, item.level, chunk_tiles=settings.chunk_tiles, augmentation=aug
                )
                remaining = len(order) - (k - k % settings.samples_per_step)
                in_step = min(settings.samples_per_step, remaining)
                step = model.train_step(
                    chunks,
                    cells,
                    shape,
                    piece.label,
                    loss_scale=1.0 / in_step,
                    class_weights=weights,
                    device=device,
                    amp=amp,
                    cache_bytes=cache_bytes,
                )
            losses.append(step.loss * in_step)
            correct += int(step.logits.argmax()) == piece.label
            if (k + 1) % settings.samples_per_step == 0 or k + 1 == len(order):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                n_step = k // settings.samples_per_step + 1
                yield Progress(
                    "step",
                    n_step,
                    steps_per_epoch,
                    f"epoch {epoch + 1}/{settings.epochs} step {n_step}/{steps_per_epoch} "
                    f"loss {np.mean(losses[-settings.samples_per_step :]):.3f}",
                    {
                        "epoch": epoch,
                        "loss": float(np.mean(losses[-settings.samples_per_step :])),
                        "lr": lr,
                    },
                )
        return {"train_loss": float(np.mean(losses)), "train_accuracy": correct / len(order)}

    def validate() -> tuple[dict[str, Any], float] | None:
        """Slide-level metrics on the validation split, scored by ``settings.select``."""
        if not val:
            return None
        metrics, rows = evaluate_grid(
            model,
            val,
            classes,
            device=device,
            amp=amp,
            chunk_tiles=settings.chunk_tiles,
            aggregation=settings.aggregation,
            frozen_cache=val_cache,
        )
        entries = {
            "val_loss": slide_loss(rows),
            "val_mean_f1": metrics.mean.f1,
            "val_accuracy": metrics.accuracy,
            "val_mean_accuracy": metrics.mean.accuracy,
            "val_auroc": metrics.auroc,
            "val_metrics": metrics.to_dict(),
        }
        if settings.select == "loss":
            return entries, -entries["val_loss"]
        return entries, metrics.mean.f1

    extra = run.checkpoint_extra(record["cohort"], settings, report)
    by_loss = settings.select == "loss"
    stopped_early = yield from run_epochs(
        run,
        settings,
        model,
        optimizer,
        train_epoch,
        validate,
        extra,
        "val loss" if by_loss else "val mean F1",
        "val_loss" if by_loss else None,
    )
    return run.summary(stopped_early)
