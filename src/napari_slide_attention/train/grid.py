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
                               mean F1 (or training loss without a validation split)
``training-state.safetensors`` optimiser, schedule and random state, to resume
``log.csv``, ``log.json``      one row per epoch: loss, lr, validation metrics, time
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models.checkpoint import (
    CheckpointError,
    load_training_state,
    read_checkpoint,
    save_checkpoint,
    save_training_state,
)
from ..models.grid_attention import GridAttention, GridAttentionConfig
from ..models.preact_resnet import load_weights
from ..progress import Progress
from ..slide.reader import open_slide
from ..slide.tissue import TissueParams, tissue_mask
from .cohort import Cohort
from .data import (
    Augmentation,
    PieceSample,
    read_level_for,
    slide_pieces,
    tile_chunks,
    tile_edge_px,
    tissue_statistics,
)
from .metrics import Metrics, evaluate

__all__ = ["GridTrainSettings", "TrainSummary", "evaluate_grid", "train_grid"]


@dataclass
class GridTrainSettings:
    """How to train (the paper's values are the defaults).

    Attributes:
        epochs: passes over the training pieces.
        lr: initial learning rate (Adam).
        lr_decay: multiplied into the learning rate after every epoch.
        lr_reset_every: every this many epochs the learning rate is reset ...
        lr_reset: ... to this value.
        weight_decay: Adam weight decay.
        samples_per_step: pieces per optimiser step (gradient accumulation).
        n_maps, kernel, dropout, hidden, trainable_blocks, tile_um, input_px: the model
            (see ``GridAttentionConfig``).
        min_tissue: tissue fraction a tile needs to be in a grid.
        augment: draw the paper's augmentation for every sample every epoch.
        scale_range: random tile scaling range.
        chunk_tiles: tiles per forward chunk (memory per step: one chunk + the grid).
        cache_mb: keep the frozen trunk's output of a step for its second pass up to this
            size (saves recomputation; 0 = always recompute).
        weights: a local file of pretrained trunk weights (safetensors or a state dict).
        calibrate_bn: estimate the frozen trunk's BN statistics from training tiles
            (None = when no weights were given).
        class_weights: "balanced" (inverse class frequency of the training pieces) or
            "none".
        device: "auto", "cpu", "cuda".
        amp: autocast; None = on CUDA only.
        seed: random seed (augmentation, dropout, order).
        normalise_tiles: tiles sampled per training slide for the normalisation statistics.
        aggregation: how pieces make a slide's call in validation.
        lesion_labels: where the cohort gives lesion boxes, label each piece with the
            highest-risk lesion inside it (the paper); off = every piece takes its slide's
            label (slide labels only).
        max_hours: stop after the epoch that passes this many hours (0 = no limit).
    """

    epochs: int = 200
    lr: float = 1e-3
    lr_decay: float = 0.95
    lr_reset_every: int = 50
    lr_reset: float = 1e-4
    weight_decay: float = 0.0
    samples_per_step: int = 2
    n_maps: int = 64
    kernel: int = 3
    dropout: float = 0.5
    hidden: tuple[int, ...] = ()
    trainable_blocks: int = 1
    tile_um: float = 246.0
    input_px: int = 224
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
    lesion_labels: bool = True
    max_hours: float = 0.0

    def __post_init__(self) -> None:
        self.hidden = tuple(int(v) for v in self.hidden)
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

    def model_config(self, classes: tuple[str, ...]) -> GridAttentionConfig:
        return GridAttentionConfig(
            classes=classes,
            n_maps=self.n_maps,
            kernel=self.kernel,
            dropout=self.dropout,
            hidden=self.hidden,
            trainable_blocks=self.trainable_blocks,
            tile_um=self.tile_um,
            input_px=self.input_px,
        )

    def learning_rate(self, epoch: int) -> float:
        """The paper's schedule: lr · decay^e, restarting at lr_reset every N epochs."""
        if self.lr_reset_every > 0 and epoch >= self.lr_reset_every:
            since = epoch % self.lr_reset_every
            return self.lr_reset * self.lr_decay**since
        return self.lr * self.lr_decay**epoch

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GridTrainSettings:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(unknown)}")
        return cls(**data)


@dataclass
class TrainSummary:
    """What a training run produced."""

    run_dir: Path
    best: Path | None
    last: Path | None
    epochs_done: int
    log: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False


@dataclass
class _SlideData:
    entry_index: int
    slide: str
    label: int
    pieces: list[PieceSample]
    level: int


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
        with open_slide(entry.slide) as slide:
            tile_px = tile_edge_px(slide, settings.tile_um)
            level = read_level_for(slide, tile_px, settings.input_px)
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
        out.append(_SlideData(i, str(entry.slide), entry.label, pieces, level))
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
        with open_slide(item.slide) as slide:
            for piece in item.pieces[:1]:
                chunks, _, _ = tile_chunks(slide, piece, item.level, chunk_tiles=per_slide)
                first = next(iter(chunks()))
                yield from first.numpy()


def evaluate_grid(
    model: GridAttention,
    data: list[_SlideData],
    classes: tuple[str, ...],
    *,
    device: torch.device,
    amp: bool,
    chunk_tiles: int,
    aggregation: str,
) -> tuple[Metrics, list[dict[str, Any]]]:
    """Slide-level metrics of ``model`` on prepared slides (no augmentation)."""
    from ..inference import aggregate

    model.eval()
    truth, probs, rows = [], [], []
    for item in data:
        with open_slide(item.slide) as slide:
            piece_probs = []
            for piece in item.pieces:
                chunks, cells, shape = tile_chunks(
                    slide, piece, item.level, chunk_tiles=chunk_tiles
                )
                out = model.predict_chunks(chunks(), cells, shape, device=device, amp=amp)
                piece_probs.append(torch.softmax(out.logits.float(), 0).cpu().numpy())
        p, _ = aggregate(piece_probs, aggregation, model.config.risk)
        truth.append(item.label)
        probs.append(p)
        rows.append({"slide": item.slide, "label": item.label, "probabilities": p.tolist()})
    probabilities = np.stack(probs).astype(np.float64)
    probabilities /= probabilities.sum(1, keepdims=True)
    return evaluate(truth, probabilities=probabilities, classes=classes), rows


def _write_log(run_dir: Path, log: list[dict[str, Any]]) -> None:
    tmp = run_dir / "log.json.tmp"
    tmp.write_text(json.dumps(log, indent=1))
    os.replace(tmp, run_dir / "log.json")
    keys: list[str] = []
    for row in log:
        keys += [k for k in row if k not in keys and not isinstance(row[k], dict | list)]
    tmp = run_dir / "log.csv.tmp"
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(log)
    os.replace(tmp, run_dir / "log.csv")


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
            normalisation and class names (which must equal the cohort's).

    Yields:
        Progress: "prepare" per slide, "step" per optimiser step (data: loss, lr),
        "epoch" per epoch (data: the log row), "checkpoint".

    Returns:
        The summary with the paths of the best and last checkpoints.
    """
    settings = settings or GridTrainSettings()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    classes = cohort.classes
    record = {
        "settings": settings.to_dict(),
        "classes": list(classes),
        "cohort": str(cohort.path) if cohort.path else None,
        "init": str(init) if init else None,
    }
    settings_file = run_dir / "settings.json"
    state_file = run_dir / "training-state.safetensors"
    resuming = resume and state_file.exists() and settings_file.exists()
    if resuming:
        previous = json.loads(settings_file.read_text())
        if previous.get("settings") != record["settings"] or previous.get("classes") != list(
            classes
        ):
            raise ValueError(
                f"{run_dir}: holds a run with other settings or classes; resume it with the "
                "same settings, or choose another --out (or pass --no-resume to start over)"
            )
    settings_file.write_text(json.dumps(record, indent=1))

    device = torch.device(
        "cuda"
        if settings.device == "auto" and torch.cuda.is_available()
        else ("cpu" if settings.device == "auto" else settings.device)
    )
    amp = settings.amp if settings.amp is not None else device.type == "cuda"
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
        base = read_checkpoint(init)
        if base.kind != config.kind or tuple(base.config.get("classes", ())) != classes:
            raise CheckpointError(init, "is not a grid-attention model for this cohort's classes")
        model.load_state_dict(base.tensors, strict=True)
        model.set_normalisation(base.config["mean"], base.config["std"])
    else:
        if settings.weights:
            report = load_weights(model.trunk, settings.weights)
            yield Progress("weights", 1, 1, report.summary())
        mean, std = tissue_statistics(_sample_tiles(train, settings.normalise_tiles))
        model.set_normalisation(mean, std)
        calibrate = (
            settings.calibrate_bn if settings.calibrate_bn is not None else not settings.weights
        )
        if calibrate:
            batches = [
                torch.from_numpy(np.stack(list(_sample_tiles([s], settings.normalise_tiles))))
                for s in train
            ]
            n = model.to(device).calibrate_frozen_batchnorm(batches)
            yield Progress("calibrate", 1, 1, f"frozen trunk BN statistics from {n} tiles")
    model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)

    counts = np.bincount([p.label for _, p in samples], minlength=len(classes)).astype(float)
    weights = None
    if settings.class_weights == "balanced":
        w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / (counts > 0).sum(), 0.0)
        weights = torch.tensor(w, dtype=torch.float32)
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad],
        lr=settings.learning_rate(0),
        weight_decay=settings.weight_decay,
    )
    log: list[dict[str, Any]] = []
    start_epoch = 0
    best_score = -math.inf
    if resuming:
        last = run_dir / "last.safetensors"
        state = load_training_state(state_file, optimizer)
        model.load_state_dict(read_checkpoint(last).tensors, strict=True)
        cfg = read_checkpoint(last).config
        model.set_normalisation(cfg["mean"], cfg["std"])
        start_epoch = int(state["epoch"]) + 1
        best_score = float(state.get("best_score", -math.inf))
        if (run_dir / "log.json").exists():
            log = [
                r
                for r in json.loads((run_dir / "log.json").read_text())
                if r["epoch"] < start_epoch
            ]
        yield Progress(
            "resume", start_epoch, settings.epochs, f"resuming after epoch {start_epoch}"
        )
    t_start = time.perf_counter()
    steps_per_epoch = math.ceil(len(samples) / settings.samples_per_step)
    cache_bytes = settings.cache_mb << 20
    stopped_early = False
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    extra_base = {"cohort": record["cohort"], "settings": settings.to_dict()}
    if report is not None:
        extra_base["weights"] = {
            "path": report.path,
            "loaded": len(report.loaded),
            "missing": len(report.missing),
        }

    for epoch in range(start_epoch, settings.epochs):
        t_epoch = time.perf_counter()
        # per-epoch random streams, so a resumed run draws what the uninterrupted one would
        rng = np.random.default_rng([settings.seed, epoch])
        torch.manual_seed(settings.seed * 100_003 + epoch)
        lr = settings.learning_rate(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
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
            with open_slide(item.slide) as slide:
                chunks, cells, shape = tile_chunks(
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
        row: dict[str, Any] = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": float(np.mean(losses)),
            "train_accuracy": correct / len(order),
            "seconds": time.perf_counter() - t_epoch,
        }
        if val:
            metrics, _ = evaluate_grid(
                model,
                val,
                classes,
                device=device,
                amp=amp,
                chunk_tiles=settings.chunk_tiles,
                aggregation=settings.aggregation,
            )
            row.update(
                {
                    "val_mean_f1": metrics.mean.f1,
                    "val_accuracy": metrics.accuracy,
                    "val_mean_accuracy": metrics.mean.accuracy,
                    "val_auroc": metrics.auroc,
                    "val_metrics": metrics.to_dict(),
                }
            )
            score = metrics.mean.f1
        else:
            score = -row["train_loss"]
        log.append(row)
        extra = {
            **extra_base,
            "epoch": epoch,
            "metrics": {k: v for k, v in row.items() if not isinstance(v, dict)},
        }
        path = save_checkpoint(
            run_dir / "checkpoints" / f"epoch-{epoch + 1:04d}.safetensors",
            config.kind,
            config.to_dict(),
            model.state_dict(),
            extra,
        )
        _replace_copy(path, run_dir / "last.safetensors")
        if score > best_score:
            best_score = score
            _replace_copy(path, run_dir / "best.safetensors")
        save_training_state(
            state_file,
            optimizer,
            {"epoch": epoch, "best_score": best_score},
        )
        _write_log(run_dir, log)
        yield Progress(
            "epoch",
            epoch + 1,
            settings.epochs,
            f"epoch {epoch + 1}: loss {row['train_loss']:.3f}"
            + (f", val mean F1 {row['val_mean_f1']:.2f}" if val else ""),
            {"row": row, "checkpoint": str(path)},
        )
        if settings.max_hours and (time.perf_counter() - t_start) / 3600 > settings.max_hours:
            stopped_early = True
            break
    best = run_dir / "best.safetensors"
    last = run_dir / "last.safetensors"
    return TrainSummary(
        run_dir,
        best if best.exists() else None,
        last if last.exists() else None,
        (log[-1]["epoch"] + 1) if log else start_epoch,
        log,
        stopped_early,
    )


def _replace_copy(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)
