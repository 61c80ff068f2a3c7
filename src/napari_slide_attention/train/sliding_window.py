"""The sliding-window baseline of Tomita et al. 2019: training it on lesion crops, tuning
its aggregation thresholds, and running it on slides.

``train_sliding_window`` is a generator of ``Progress`` events returning a
``TrainSummary``, like ``train_grid``. Unlike the grid-attention model, the baseline
needs lesion boxes: every epoch it cuts ``crops_per_lesion`` crops around each lesion of
the training slides (the crop centre drawn uniformly inside the lesion box, so crops
jitter around it), labelled with the lesion's class, and ``negatives_per_slide`` tissue
tiles of each slide that overlap no lesion box, labelled with the lowest-risk class.
That assumes the boxes cover every lesion of a slide, as the paper's pathologists'
annotations did. Crops are read at the pyramid level closest to the model's input
resolution, rotated by quarter turns and flipped at random, resized and normalised by
the cohort's tissue-pixel statistics.

The paper's recipe (section 4.2): He initialisation, cross-entropy, 100 epochs,
weight regularisation and learning-rate decay; ours are Adam at lr 1e-3, decayed by
0.95 per epoch, weight decay 1e-4. After training, the per-class thresholds and minimum
tile counts of ``aggregate_tiles`` are chosen by grid search on the validation split
(slide-level mean F1) and written into the best checkpoint's config.

The run directory (``loop.RunDirectory``, as ``train_grid``'s) holds ``settings.json``,
``checkpoints/epoch-NNNN.safetensors``, ``last.safetensors``, ``best.safetensors`` (best
validation crop-level mean F1, or training loss without a validation split; it carries the
tuned thresholds), ``training-state.safetensors``, ``log.csv`` and ``log.json``.

Running a trained baseline on a slide is ``inference/sliding_window.py``'s; the crops
pipeline (sources, the epoch's draw, batched reads) is ``train/crops.py``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..inference.sliding_window import predict_sliding_window, tile_probabilities
from ..jobs import Progress, run_to_end
from ..models.checkpoint import load_model, save_checkpoint
from ..models.device import Autocast, default_amp, resolve_device
from ..models.sliding_window import CropClassifier, SlidingWindowConfig
from ..slide.tissue import TissueParams
from .cohort import Cohort
from .crops import (
    Crop,
    CropSource,
    check_lesions,
    crop_batches,
    draw_crops,
    expected_counts,
    prepare_sources,
    prepared,
    sample_tiles,
)
from .loop import (
    RunDirectory,
    SettingsRecord,
    TrainSummary,
    adam,
    class_weights,
    initialise,
    on_device,
    run_epochs,
)
from .metrics import Metrics, evaluate

__all__ = [
    "SlidingWindowSettings",
    "TunedRule",
    "train_sliding_window",
    "tune_thresholds",
]

# Above this many threshold/count combinations the search is coordinate-wise (see
# tune_thresholds); the paper's four classes (27,000 combinations) stay exhaustive.
_MAX_EXHAUSTIVE = 30_000


@dataclass
class SlidingWindowSettings(SettingsRecord):
    """How to train the sliding-window baseline.

    Attributes:
        epochs: passes over freshly drawn crops (100 in the paper).
        lr: Adam learning rate.
        lr_decay: multiplied into the learning rate after every epoch.
        weight_decay: Adam weight decay (the paper's "weight regularisation").
        batch_size: crops per optimiser step.
        crops_per_lesion: crops drawn around each lesion box per epoch (centre uniform
            inside the box).
        negatives_per_slide: lesion-free tissue tiles drawn from each slide per epoch,
            labelled the lowest-risk class.
        augment: random quarter turns and flips of every crop.
        min_tissue: tissue fraction a tile needs to be a negative, or to be classified at
            inference.
        chunk_tiles: tiles per forward pass when classifying whole slides (tuning).
        weights: a local file of pretrained trunk weights (safetensors or a state dict).
        calibrate_bn: estimate the frozen trunk stages' BN statistics from training tiles
            (None = when no weights were given; nothing to do when all stages train).
        class_weights: "balanced" (inverse class frequency of an epoch's crops) or "none".
        device: "auto", "cpu", "cuda".
        amp: autocast; None = ``models.device.default_amp``.
        seed: random seed (crop positions, augmentation, dropout, order).
        normalise_tiles: tissue tiles read per training slide for the normalisation
            statistics (and the BN calibration).
        threshold_grid: probability thresholds tried per class when tuning.
        min_count_grid: minimum tile counts tried per class when tuning.
        max_hours: stop after the epoch that passes this many hours (0 = no limit).
        model: the crop classifier's settings (``SlidingWindowConfig``'s crop_um: crop
            edge in micrometres; input_px: crop edge fed to the network;
            trainable_blocks: trunk stages that train, 5 = all as the paper's baseline;
            dropout; thresholds and min_counts, which tuning sets).
    """

    model_type: ClassVar[type] = SlidingWindowConfig
    # the aggregation rule is tuned after training, not set
    _NOT_MODEL: ClassVar[tuple[str, ...]] = (
        *SettingsRecord._NOT_MODEL,
        "thresholds",
        "min_counts",
    )

    epochs: int = 100
    lr: float = 1e-3
    lr_decay: float = 0.95
    weight_decay: float = 1e-4
    batch_size: int = 32
    crops_per_lesion: int = 8
    negatives_per_slide: int = 16
    augment: bool = True
    min_tissue: float = 0.5
    chunk_tiles: int = 64
    weights: str | None = None
    calibrate_bn: bool | None = None
    class_weights: str = "balanced"
    device: str = "auto"
    amp: bool | None = None
    seed: int = 0
    normalise_tiles: int = 64
    threshold_grid: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
    min_count_grid: tuple[int, ...] = (1, 2, 3, 5, 8)
    max_hours: float = 0.0
    model: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_model()
        self.threshold_grid = tuple(float(v) for v in self.threshold_grid)
        self.min_count_grid = tuple(int(v) for v in self.min_count_grid)
        if self.epochs < 1 or self.batch_size < 2 or self.chunk_tiles < 1:
            raise ValueError("epochs and chunk_tiles must be at least 1, batch_size at least 2")
        if self.crops_per_lesion < 1 or self.negatives_per_slide < 0:
            raise ValueError("crops_per_lesion must be at least 1, negatives_per_slide >= 0")
        if self.lr <= 0 or not 0 < self.lr_decay <= 1 or self.weight_decay < 0:
            raise ValueError("lr must be positive, lr_decay in (0, 1], weight_decay >= 0")
        if self.class_weights not in ("balanced", "none"):
            raise ValueError("class_weights must be 'balanced' or 'none'")
        if not self.threshold_grid or not all(0 <= t <= 1 for t in self.threshold_grid):
            raise ValueError(f"threshold_grid needs values in [0, 1], got {self.threshold_grid}")
        if not self.min_count_grid or min(self.min_count_grid) < 1:
            raise ValueError(f"min_count_grid needs values >= 1, got {self.min_count_grid}")
        if self.normalise_tiles < 1:
            raise ValueError("normalise_tiles must be at least 1")

    def learning_rate(self, epoch: int) -> float:
        """lr · decay^epoch."""
        return self.lr * self.lr_decay**epoch


@dataclass
class TunedRule:
    """The aggregation rule chosen on the validation split.

    Attributes:
        thresholds: (C,) per-class probability thresholds.
        min_counts: (C,) per-class minimum tile counts.
        metrics: slide-level metrics of the rule on the validation slides.
        combinations: threshold/count combinations evaluated.
        search: "exhaustive" or "coordinate".
    """

    thresholds: tuple[float, ...]
    min_counts: tuple[int, ...]
    metrics: Metrics
    combinations: int
    search: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "thresholds": list(self.thresholds),
            "min_counts": list(self.min_counts),
            "val_mean_f1": self.metrics.mean.f1,
            "val_accuracy": self.metrics.accuracy,
            "val_slides": self.metrics.n,
            "combinations": self.combinations,
            "search": self.search,
        }


def _crop_metrics(
    model: CropClassifier,
    crops: list[Crop],
    sources: Sequence[CropSource],
    classes: tuple[str, ...],
    *,
    device: torch.device,
    amp: bool,
    batch_size: int,
) -> Metrics:
    """Crop-level metrics (validation crops, no augmentation)."""
    model.eval()
    autocast = Autocast(device, amp)
    truth, probs = [], []
    with torch.no_grad():
        for tiles, labels in crop_batches(crops, sources, batch_size):
            with autocast():
                logits = model.classify(prepared(model, tiles, device))
            probs.append(torch.softmax(logits.float(), 1).cpu().numpy())
            truth.append(labels)
    return evaluate(np.concatenate(truth), probabilities=np.concatenate(probs), classes=classes)


def train_sliding_window(
    cohort: Cohort,
    run_dir: str | os.PathLike,
    settings: SlidingWindowSettings | None = None,
    resume: bool = True,
    *,
    tissue: TissueParams | None = None,
) -> Generator[Progress, None, TrainSummary]:
    """Train the sliding-window crop classifier and tune its aggregation thresholds.

    Args:
        cohort: slides, labels, splits and lesion boxes (needed for every training and
            validation slide above the lowest-risk class).
        run_dir: where checkpoints and logs go.
        settings: training settings.
        resume: continue a run found in ``run_dir`` (its settings must match).
        tissue: tissue detection settings.

    Yields:
        Progress: "prepare" per slide, "weights", "calibrate", "resume", "step" per
        optimiser step (data: loss, lr), "epoch" per epoch (data: the log row), "tune"
        per validation slide and once with the chosen rule (data: the rule), "checkpoint"
        when the best checkpoint has been re-saved with it.

    Returns:
        The summary with the paths of the best and last checkpoints.

    Raises:
        ValueError: a training or validation slide above the lowest-risk class without
            lesion boxes (the message names it), no training crops, or a run in
            ``run_dir`` with other settings.
    """
    settings = settings or SlidingWindowSettings()
    classes = cohort.classes
    config = settings.model_config(classes)
    risk = config.risk
    check_lesions(cohort, ("train", "val"), risk)
    record = {
        "model": config.kind,
        "settings": settings.to_dict(),
        "classes": list(classes),
        "cohort": str(cohort.path) if cohort.path else None,
    }
    run = RunDirectory(
        run_dir, record, resume=resume, need_last=True, settings_type=SlidingWindowSettings
    )

    device = resolve_device(settings.device)
    amp = settings.amp if settings.amp is not None else default_amp(device)
    torch.manual_seed(settings.seed)
    lowest = risk[0]

    train = yield from prepare_sources(cohort, "train", settings, tissue)
    val = yield from prepare_sources(cohort, "val", settings, tissue)
    counts = expected_counts(train, settings, len(classes), lowest)
    present = np.nonzero(counts)[0]
    if counts.sum() < 2 or len(present) < 2:
        raise ValueError(
            f"the training split gives crops of class(es) {[classes[c] for c in present]} "
            "only; the crop classifier needs at least two classes"
        )

    model = CropClassifier(config)
    report = None
    if not run.resuming:
        report = yield from initialise(
            model,
            settings,
            train,
            sample_tiles,
            device,
            calibrate=model.config.trainable_blocks < 5,
        )
    model = on_device(model, device)

    weights = class_weights(settings.class_weights, counts, device)
    optimizer = adam(model, settings)
    yield from run.restore(model, optimizer, settings.epochs)
    # fixed validation crops (no augmentation), the same every epoch
    val_crops = draw_crops(
        val, settings, np.random.default_rng([settings.seed, 1_000_003]), lowest, False
    )
    autocast = Autocast(device, amp)

    def train_epoch(
        epoch: int, rng: np.random.Generator, lr: float
    ) -> Generator[Progress, None, dict[str, Any]]:
        """One pass over freshly drawn crops, ``batch_size`` per optimiser step."""
        crops = draw_crops(train, settings, rng, lowest, settings.augment)
        steps = max(1, len(crops) // settings.batch_size + (len(crops) % settings.batch_size > 1))
        losses, sizes, correct = [], [], 0
        model.train()
        for step, (tiles, labels) in enumerate(crop_batches(crops, train, settings.batch_size)):
            target = torch.from_numpy(labels).to(device)
            with autocast():
                logits = model.classify(prepared(model, tiles, device))
            loss = F.cross_entropy(logits.float(), target, weight=weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            sizes.append(len(labels))
            correct += int((logits.detach().argmax(1) == target).sum())
            yield Progress(
                "step",
                step + 1,
                steps,
                f"epoch {epoch + 1}/{settings.epochs} step {step + 1}/{steps} "
                f"loss {losses[-1]:.3f}",
                {"epoch": epoch, "loss": losses[-1], "lr": lr},
            )
        return {
            "train_loss": float(np.average(losses, weights=sizes)),
            "train_accuracy": correct / len(crops),
            "crops": len(crops),
        }

    def validate() -> tuple[dict[str, Any], float] | None:
        """Crop-level metrics on the fixed validation crops, scored by mean F1."""
        if not val_crops:
            return None
        metrics = _crop_metrics(
            model,
            val_crops,
            val,
            classes,
            device=device,
            amp=amp,
            batch_size=settings.batch_size,
        )
        entries = {
            "val_crop_mean_f1": metrics.mean.f1,
            "val_crop_accuracy": metrics.accuracy,
            "val_crop_metrics": metrics.to_dict(),
        }
        return entries, metrics.mean.f1

    extra = run.checkpoint_extra(record["cohort"], settings, report)
    stopped_early = yield from run_epochs(
        run, settings, model, optimizer, train_epoch, validate, extra, "val crop mean F1"
    )
    if run.best.exists():
        yield from _tune_best(run.best, val, settings, device, amp, tissue)
    return run.summary(stopped_early)


def _tune_best(
    best: Path,
    val: Sequence[CropSource],
    settings: SlidingWindowSettings,
    device: torch.device,
    amp: bool,
    tissue: TissueParams | None,
) -> Generator[Progress, None, None]:
    """Choose the aggregation rule on the validation slides; re-save ``best`` with it."""
    slides = [src for src in val if src.pieces]
    if not slides:
        yield Progress(
            "tune",
            0,
            0,
            "no validation split (or no validation slide with tissue): the aggregation "
            "thresholds keep their defaults (p >= 0.5 in 1 tile per class)",
        )
        return
    model, checkpoint = load_model(best, device)
    tiles, labels = [], []
    for i, src in enumerate(slides):
        result = run_to_end(
            predict_sliding_window(
                model,
                src.slide,
                device=device,
                chunk_tiles=settings.chunk_tiles,
                tissue=tissue,
                min_tissue=settings.min_tissue,
                amp=amp,
                mpp=src.mpp,
                pieces=src.pieces,
            )
        )
        tiles.append(tile_probabilities(result))
        labels.append(src.label)
        yield Progress(
            "tune",
            i + 1,
            len(slides),
            f"validation slide {Path(src.slide).name}: {len(tiles[-1])} tiles",
        )
    rule = tune_thresholds(
        tiles,
        labels,
        model.config.classes,
        model.config.risk,
        settings.threshold_grid,
        settings.min_count_grid,
    )
    model.set_rule(rule.thresholds, rule.min_counts)
    save_checkpoint(
        best,
        model.config.kind,
        model.config.to_dict(),
        checkpoint.tensors,
        {**checkpoint.extra, "aggregation": rule.to_dict()},
    )
    shown = ", ".join(
        f"{model.config.classes[k]} p>={rule.thresholds[k]:g} x{rule.min_counts[k]}"
        for k in model.config.risk[1:]
    )
    yield Progress(
        "tune",
        len(slides),
        len(slides),
        f"aggregation rule ({rule.search} search, {rule.combinations} combinations): {shown}; "
        f"validation slide mean F1 {rule.metrics.mean.f1:.2f}",
        {"rule": rule.to_dict()},
    )
    yield Progress("checkpoint", 1, 1, f"{best}: tuned thresholds saved", {"path": str(best)})


def tune_thresholds(
    tile_probabilities: Sequence[np.ndarray],
    labels: Sequence[int],
    classes: Sequence[str],
    risk: Sequence[int],
    threshold_grid: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95),
    min_count_grid: Sequence[int] = (1, 2, 3, 5, 8),
) -> TunedRule:
    """The per-class thresholds and minimum counts that maximise the slides' mean F1.

    Every class above the lowest risk gets a (threshold, count) pair from the grids. When
    all combinations number at most 30,000 they are all tried; beyond that (five classes
    or more with the default grids) the search starts from the best pair shared by all
    classes and then improves one class at a time, highest risk first, until no change
    helps (a coordinate-wise grid search). Mean F1 (``train.metrics.evaluate``) decides,
    then multiclass accuracy; remaining ties go to the first combination in grid order
    (lower thresholds and counts first).

    Args:
        tile_probabilities: per slide, (N, C) probabilities of its tissue tiles.
        labels: the slides' class indices.
        classes: class names.
        risk: class indices from lowest to highest risk.
        threshold_grid: thresholds to try.
        min_count_grid: minimum counts to try.

    Returns:
        The chosen rule (the lowest-risk class keeps threshold 0.5 and count 1, unused).
    """
    classes = tuple(classes)
    n_classes = len(classes)
    if not tile_probabilities or len(tile_probabilities) != len(labels):
        raise ValueError("need the tile probabilities and the label of at least one slide")
    grid_t = np.array(sorted({float(t) for t in threshold_grid}))
    grid_m = sorted({int(m) for m in min_count_grid})
    risk = [int(r) for r in risk]
    lowest, ranked = risk[0], risk[1:]
    # hits[s, k, t]: tiles of slide s with p_k >= grid_t[t]
    hits = np.zeros((len(labels), n_classes, len(grid_t)), dtype=np.int64)
    for s, probs in enumerate(tile_probabilities):
        probs = np.asarray(probs, dtype=np.float64).reshape(-1, n_classes)  # (N, C)
        hits[s] = (probs[:, :, None] >= grid_t[None, None, :]).sum(0)
    truth = np.asarray(labels, dtype=np.int64)
    options = [(t, m) for t in range(len(grid_t)) for m in grid_m]
    scores: dict[bytes, tuple[tuple[float, float], Metrics]] = {}

    def score(choice: Sequence[tuple[int, int]]) -> tuple[tuple[float, float], Metrics]:
        predicted = np.full(len(truth), lowest, dtype=np.int64)
        for k, (t, m) in zip(ranked, choice, strict=True):  # low to high: highest risk wins
            predicted[hits[:, k, t] >= m] = k
        key = predicted.tobytes()
        if key not in scores:  # many combinations give the same calls
            metrics = evaluate(truth, predicted, classes=classes)
            scores[key] = ((metrics.mean.f1, metrics.accuracy), metrics)
        return scores[key]

    tried = 0
    best_choice: list[tuple[int, int]] | None = None
    best_key: tuple[float, float] = (-1.0, -1.0)
    best_metrics: Metrics | None = None

    def consider(choice: Sequence[tuple[int, int]]) -> bool:
        nonlocal tried, best_choice, best_key, best_metrics
        tried += 1
        key, metrics = score(choice)
        if key > best_key:
            best_choice, best_key, best_metrics = list(choice), key, metrics
            return True
        return False

    if len(options) ** len(ranked) <= _MAX_EXHAUSTIVE:
        search = "exhaustive"
        for choice in itertools.product(options, repeat=len(ranked)):
            consider(choice)
    else:
        search = "coordinate"
        for option in options:
            consider([option] * len(ranked))
        improved = True
        while improved:
            improved = False
            for j in reversed(range(len(ranked))):
                for option in options:
                    choice = list(best_choice)
                    choice[j] = option
                    improved |= consider(choice)
    thresholds = [0.5] * n_classes
    min_counts = [1] * n_classes
    for k, (t, m) in zip(ranked, best_choice, strict=True):
        thresholds[k], min_counts[k] = float(grid_t[t]), int(m)
    return TunedRule(tuple(thresholds), tuple(min_counts), best_metrics, tried, search)
