"""Training and running the dual attention model (Raza et al.) on a cohort.

``train_dual`` is a generator of ``Progress`` events returning a ``TrainSummary``, like
``train_grid``; the run directory, resume, checkpoints and logs are ``train/loop.py``'s.
``predict_slide_dual`` runs a trained model on one slide and returns a ``SlideResult``.

One training step (the paper, section IV-A2): ``slides_per_step`` slides, chosen so that
a step mixes the classes (round robin over the classes, each class's slides shuffled);
for each slide

1. the soft attention A over its x32 view (views are read once and kept: they are small);
2. soft attention loss (``mode`` "joint" or "soft"): ``soft_samples`` cells drawn from A
   without replacement, their tiles read at ``feature_px``, the expectation of their
   features under A (Katharopoulos & Fleuret's estimator) classified -> L_SA;
3. hard attention (``mode`` "joint" or "hard"): N tiles chosen by the paper's sampling
   (noise inside the refined mask, top-2N, distinct N; ``sampler="random"`` draws them
   uniformly in tissue instead: the random-sampling baseline), read at the hard model's
   ``tile_px``, rotated/flipped at random, each labelled with its slide's class; T glimpses
   per tile -> L_HA.

The step's loss is L_J = L_HA + α^e·L_SA ("joint"), L_SA ("soft") or L_HA ("hard"). Adam
with one learning rate per part (the paper: 1e-4 for the soft attention, 1e-3 for the
hard attention) and a step schedule (StepLR: ×``lr_gamma`` every ``lr_step`` epochs).

A slide's call: the most frequent tile class (ties go to the higher-risk class); its
probabilities are the mean tile probabilities, so the confidence is the mean tile
probability of that class (the paper's HER2 confidence).
"""

from __future__ import annotations

import os
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..inference import resolve_device
from ..models.dual_attention import DualAttention, DualAttentionConfig
from ..models.hard_attention import hard_attention_loss
from ..models.sampling import random_tiles, sample_tiles, sample_without_replacement
from ..progress import Progress
from ..results import SlideResult
from ..slide.reader import Slide, open_slide
from ..slide.tissue import TissueParams, tissue_mask
from .cohort import Cohort
from .data import SlideView, read_tiles, read_view, tile_edge_px, tissue_statistics
from .loop import (
    RunDirectory,
    SettingsRecord,
    TrainSummary,
    class_weights,
    load_init,
    on_device,
    run_epochs,
)
from .metrics import Metrics, evaluate

__all__ = [
    "SAMPLERS",
    "DualTrainSettings",
    "TileSelection",
    "predict_slide_dual",
    "select_tiles",
    "train_dual",
]

MODES = ("joint", "soft", "hard")
# A small dual model for a CPU and 0.5 µm/px slides, as ``DualTrainSettings`` keywords
# (the dual needle benchmark and the demo use it; why each value is what it is:
# ``benchmarks/dual_needle.py``): the x32 view with max-pooling 4 (attention cells of
# 128 level-0 px), 8 tiles of 128 µm read at 64 px for the soft attention's features and
# at 128 px for 4 glimpses of 32 px at two magnifications; β = 0.01; the soft attention
# at 1e-3 from 32 draws of A per slide.
CPU_PRESET: dict[str, Any] = {
    "lr_soft": 1e-3,
    "soft_samples": 32,
    "view_downsample": 32.0,
    "soft": {"pool": 4, "entropy_weight": 0.01},
    "n_tiles": 8,
    "tile_um": 128.0,
    "feature_px": 64,
    "hard": {
        "glimpses": 4,
        "glimpse_px": 32,
        "tile_px": 128,
        "context_px": 64,
        "feature": 128,
        "hidden": [128, 64],
        "glimpse_channels": [16, 32, 64],
        "context_channels": [8, 16, 32],
    },
}
SAMPLERS = ("attention", "random")


@dataclass
class DualTrainSettings(SettingsRecord):
    """How to train the dual model (the paper's values are the defaults).

    Attributes:
        epochs: passes over the training slides.
        lr: the hard attention's learning rate (Adam), the schedule's base.
        lr_soft: the soft attention's (and its feature network's) learning rate.
        lr_step, lr_gamma: StepLR: the rates are multiplied by ``lr_gamma`` every
            ``lr_step`` epochs (the paper names StepLR without its values; ours).
        weight_decay: Adam weight decay.
        mode: "joint" (L_HA + α^e·L_SA), "soft" (soft attention only) or "hard" (hard
            attention only, on tiles chosen by the soft attention as it is).
        sampler: "attention" (the paper's sampling) or "random" (tiles uniformly in
            tissue: the random-sampling baseline).
        slides_per_step: slides per optimiser step (the paper: four, of four classes).
        soft_samples: cells drawn from A per slide for the soft attention's loss (None: N).
        view_downsample, n_tiles, candidates, min_distance, refine, noise, tile_um,
            feature_px, feature_width, soft, hard, joint_alpha: the model (see
            ``DualAttentionConfig``).
        augment: random quarter turns and flips of the tiles.
        class_weights: "balanced" (inverse class frequency of the training slides) or
            "none", for the classification losses.
        normalise_tiles: tiles per training slide for the normalisation statistics.
        device: "auto", "cpu", "cuda".
        seed: random seed.
        max_hours: stop after the epoch that passes this many hours (0 = no limit).
        weights, calibrate_bn: unused by this model (kept for the shared loop).
    """

    epochs: int = 100
    lr: float = 1e-3
    lr_soft: float = 1e-4
    lr_step: int = 30
    lr_gamma: float = 0.5
    weight_decay: float = 0.0
    mode: str = "joint"
    sampler: str = "attention"
    slides_per_step: int = 4
    soft_samples: int | None = None
    view_downsample: float = 32.0
    n_tiles: int = 10
    candidates: int | None = None
    min_distance: float | None = None
    refine: str = "threshold"
    noise: tuple[float, float] = (0.0, 1.0)
    tile_um: float = 512.0
    feature_px: int = 128
    feature_width: int = 32
    soft: dict[str, Any] = field(default_factory=dict)
    hard: dict[str, Any] = field(default_factory=dict)
    joint_alpha: float = 0.5
    augment: bool = True
    class_weights: str = "balanced"
    normalise_tiles: int = 16
    device: str = "auto"
    seed: int = 0
    max_hours: float = 0.0
    weights: str | None = None
    calibrate_bn: bool | None = None

    def __post_init__(self) -> None:
        self.noise = tuple(float(v) for v in self.noise)
        self.soft = dict(self.soft)
        self.hard = dict(self.hard)
        if self.epochs < 1 or self.slides_per_step < 1 or self.lr_step < 1:
            raise ValueError("epochs, slides_per_step and lr_step must be at least 1")
        if self.lr <= 0 or self.lr_soft <= 0 or not 0 < self.lr_gamma <= 1:
            raise ValueError("learning rates must be positive and lr_gamma in (0, 1]")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.sampler == "random" and self.mode != "hard":
            raise ValueError(
                "the random-sampling baseline trains the hard attention only (mode 'hard')"
            )
        if self.class_weights not in ("balanced", "none"):
            raise ValueError("class_weights must be 'balanced' or 'none'")
        if self.weights:
            raise ValueError("the dual model takes no pretrained trunk weights (use --init)")

    def model_config(self, classes: tuple[str, ...]) -> DualAttentionConfig:
        return DualAttentionConfig(
            classes=classes,
            view_downsample=self.view_downsample,
            soft=self.soft,
            n_tiles=self.n_tiles,
            candidates=self.candidates,
            min_distance=self.min_distance,
            refine=self.refine,
            noise=self.noise,
            tile_um=self.tile_um,
            feature_px=self.feature_px,
            feature_width=self.feature_width,
            hard=self.hard,
            joint_alpha=self.joint_alpha,
        )

    def learning_rate(self, epoch: int) -> float:
        """StepLR: lr · gamma^(epoch // step) (the soft part runs at lr_soft / lr of it)."""
        return self.lr * self.lr_gamma ** (epoch // self.lr_step)


# ----------------------------------------------------------------------------------------
# Tile selection (shared by training, validation and inference)


@dataclass(frozen=True)
class TileSelection:
    """The tiles chosen on one slide and where they came from.

    Attributes:
        boxes: (N, 4) int64 level-0 (x, y, w, h).
        attention: (N,) the soft attention A at each tile's cell.
        rank: (N,) order of choice (0 first).
        cells: (N, 2) (row, col) attention cells.
        attention_map: (h', w') float32 A over the view's cells.
        tissue: (h', w') bool, the cells that are tissue.
        cell_px: level-0 px per attention cell.
        note: what the sampler reported (fewer tiles than asked, mask fallback, ...).
    """

    boxes: np.ndarray
    attention: np.ndarray
    rank: np.ndarray
    cells: np.ndarray
    attention_map: np.ndarray
    tissue: np.ndarray
    cell_px: float
    note: str = ""


def select_tiles(
    model: DualAttention,
    view: SlideView,
    slide_size: tuple[int, int],
    tile_px: int,
    rng: np.random.Generator,
    *,
    sampler: str = "attention",
    device: torch.device | None = None,
) -> TileSelection:
    """The soft attention over a view and the N tiles it (or the random baseline) picks.

    Args:
        model: the dual model.
        view: the slide's view and tissue mask.
        slide_size: level-0 (width, height), to keep tiles inside the slide.
        tile_px: tile edge in level-0 px.
        rng: noise and random choices.
        sampler: "attention" or "random".
        device: where the soft attention runs.
    """
    config = model.config
    device = device or next(model.parameters()).device
    with torch.no_grad():
        out = model.attend(
            torch.from_numpy(view.image)[None].to(device),
            torch.from_numpy(view.tissue)[None].to(device),
        )
    attention = out.attention[0].float().cpu().numpy()
    tissue = out.tissue[0].cpu().numpy()
    cell_px = view.downsample * model.soft.config.pool
    distance = config.min_distance if config.min_distance is not None else tile_px / cell_px
    common = {
        "cell_size": cell_px,
        "origin": (0, 0),
        "tile_size": tile_px,
        "slide_size": slide_size,
        "rng": rng,
    }
    if sampler == "random":
        picked = random_tiles(tissue, config.n_tiles, distance=distance, **common)
    else:
        picked = sample_tiles(
            attention,
            tissue,
            config.n_tiles,
            refine=config.refine,
            noise=config.noise,
            distance=distance,
            candidates=config.candidates,
            **common,
        )
    flat = attention[picked.cells[:, 0], picked.cells[:, 1]] if len(picked.cells) else np.zeros(0)
    return TileSelection(
        boxes=np.asarray(picked.boxes, dtype=np.int64),
        attention=np.asarray(flat, dtype=np.float32),
        rank=np.asarray(picked.rank, dtype=np.int64),
        cells=np.asarray(picked.cells, dtype=np.int64),
        attention_map=attention.astype(np.float32),
        tissue=tissue.astype(bool),
        cell_px=float(cell_px),
        note=getattr(picked, "note", "") or "",
    )


def _augment(tiles: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random quarter turn and flip per tile ((N, h, w, 3) uint8, square tiles)."""
    out = np.empty_like(tiles)
    for i, t in enumerate(tiles):
        t = np.rot90(t, int(rng.integers(4)))
        out[i] = t[:, ::-1] if rng.random() < 0.5 else t
    return out


def _cell_boxes(cells: np.ndarray, cell_px: float, tile_px: int, slide_size: tuple[int, int]):
    """Level-0 tile boxes centred on cells ((N, 2) rows, cols of a grid of ``cell_px``
    level-0 px per cell), shifted to lie inside the slide."""
    centres = (cells + 0.5) * cell_px  # (N, 2) y, x
    x0 = np.round(centres[:, 1] - tile_px / 2)
    y0 = np.round(centres[:, 0] - tile_px / 2)
    width, height = slide_size
    x0 = np.clip(x0, 0, max(0, width - tile_px))
    y0 = np.clip(y0, 0, max(0, height - tile_px))
    n = len(cells)
    return np.stack([x0, y0, np.full(n, tile_px), np.full(n, tile_px)], 1).astype(np.int64)


# ----------------------------------------------------------------------------------------
# Tile classification and the slide call


def slide_call(tile_probabilities: np.ndarray, risk: Sequence[int]) -> tuple[np.ndarray, int]:
    """The slide's probabilities (mean over tiles) and class (most frequent tile class,
    ties to the higher risk)."""
    probs = np.asarray(tile_probabilities, dtype=np.float64)
    mean = probs.mean(0)
    votes = np.bincount(probs.argmax(1), minlength=probs.shape[1])
    rank = {c: i for i, c in enumerate(risk)}
    top = max(range(len(votes)), key=lambda c: (votes[c], rank[c]))
    return (mean / mean.sum()).astype(np.float32), int(top)


@dataclass(frozen=True)
class _TileRun:
    probabilities: np.ndarray  # (N, K) final-step
    step_probabilities: np.ndarray  # (N, T, K)
    locations: np.ndarray  # (N, T, 2) in [-1, 1] (x, y)


def _run_hard(
    model: DualAttention,
    tiles: np.ndarray,
    device: torch.device,
    generator: torch.Generator | None,
    chunk: int = 32,
) -> _TileRun:
    """The hard attention on tiles (inference: policy means; random first glimpse drawn
    from ``generator``)."""
    px = model.hard.config.tile_px
    probs, steps, locs = [], [], []
    with torch.no_grad():
        for i in range(0, len(tiles), chunk):
            x = model.prepare(torch.from_numpy(tiles[i : i + chunk]), px).to(device)
            episode = model.hard(x, sample=False, generator=generator)
            p = torch.softmax(episode.logits.float(), -1)  # (B, T, K)
            probs.append(p[:, -1].cpu().numpy())
            steps.append(p.cpu().numpy())
            locs.append(episode.locations.float().cpu().numpy())
    k = len(model.config.classes)
    t = model.hard.config.glimpses
    if not probs:
        return _TileRun(np.zeros((0, k)), np.zeros((0, t, k)), np.zeros((0, t, 2)))
    return _TileRun(np.concatenate(probs), np.concatenate(steps), np.concatenate(locs))


# ----------------------------------------------------------------------------------------
# Training


@dataclass
class _SlideData:
    slide: str
    label: int
    view: SlideView
    size: tuple[int, int]
    tile_px: int


def _prepare(
    cohort: Cohort, split: str, settings: DualTrainSettings, tissue: TissueParams | None
) -> Generator[Progress, None, list[_SlideData]]:
    entries = [e for e in cohort.entries if e.split == split]
    out = []
    for n, entry in enumerate(entries):
        with open_slide(entry.slide) as slide:
            mask = tissue_mask(slide, tissue)
            view = read_view(slide, settings.view_downsample, mask=mask)
            tile_px = tile_edge_px(slide, settings.tile_um)
            size = slide.dimensions
        if not view.tissue.any():
            yield Progress(
                "prepare", n + 1, len(entries), f"{entry.slide.name}: no tissue, skipped"
            )
            continue
        out.append(_SlideData(str(entry.slide), entry.label, view, size, tile_px))
        yield Progress(
            "prepare",
            n + 1,
            len(entries),
            f"{split}: {entry.slide.name}: view {view.shape[1]}x{view.shape[0]} px",
        )
    return out


def _mixed_steps(labels: Sequence[int], per_step: int, rng: np.random.Generator) -> list[list[int]]:
    """An epoch's steps of ``per_step`` slide indices: the classes taken in turn (so a step
    of 4 holds 4 classes where there are 4), each class's slides in a shuffled order, until
    every slide has been used (the classes with fewer slides then repeat some)."""
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(labels):
        by_class.setdefault(int(c), []).append(i)
    classes = [int(c) for c in rng.permutation(sorted(by_class))]
    queues = {c: [int(i) for i in rng.permutation(by_class[c])] for c in classes}
    unused = set(range(len(labels)))
    steps: list[list[int]] = []
    turn = 0
    while unused:
        step = []
        for _ in range(per_step):
            c = classes[turn % len(classes)]
            turn += 1
            if not queues[c]:
                queues[c] = [int(i) for i in rng.permutation(by_class[c])]
            index = queues[c].pop()
            unused.discard(index)
            step.append(index)
        steps.append(step)
    return steps


def evaluate_dual(
    model: DualAttention,
    data: list[_SlideData],
    classes: tuple[str, ...],
    device: torch.device,
    *,
    sampler: str = "attention",
    seed: int = 0,
):
    """Slide-level metrics of ``model`` on prepared slides (fixed seeds)."""
    model.eval()
    truth, probs = [], []
    for k, item in enumerate(data):
        rng = np.random.default_rng([seed, k])
        chosen = select_tiles(
            model, item.view, item.size, item.tile_px, rng, sampler=sampler, device=device
        )
        with open_slide(item.slide) as slide:
            tiles = read_tiles(slide, chosen.boxes, model.hard.config.tile_px)
        generator = torch.Generator(device="cpu").manual_seed(seed * 7919 + k)
        run = _run_hard(model, tiles, device, generator)
        p, _ = slide_call(run.probabilities, model.config.risk)
        truth.append(item.label)
        probs.append(p)
    probabilities = np.stack(probs).astype(np.float64)
    probabilities /= probabilities.sum(1, keepdims=True)
    return evaluate(truth, probabilities=probabilities, classes=classes)


def train_dual(
    cohort: Cohort,
    run_dir: str | os.PathLike,
    settings: DualTrainSettings | None = None,
    *,
    resume: bool = True,
    tissue: TissueParams | None = None,
    init: str | os.PathLike | None = None,
) -> Generator[Progress, None, TrainSummary]:
    """Train a dual attention model on a cohort's training split (slide labels only).

    Args:
        cohort: slides, labels and splits.
        run_dir: where checkpoints and logs go.
        settings: training settings (the paper's by default).
        resume: continue a run found in ``run_dir`` (its settings must match).
        tissue: tissue detection settings.
        init: start from this dual-attention checkpoint (its weights, normalisation and
            class names, which must equal the cohort's): e.g. train the soft attention
            first (mode "soft"), then the hard attention on its tiles (mode "hard").

    Yields:
        Progress: "prepare" per slide, "step" per optimiser step, "epoch" per epoch.

    Returns:
        The summary with the paths of the best and last checkpoints.
    """
    settings = settings or DualTrainSettings()
    classes = cohort.classes
    record = {
        "settings": settings.to_dict(),
        "classes": list(classes),
        "cohort": str(cohort.path) if cohort.path else None,
        "init": str(init) if init else None,
    }
    run = RunDirectory(run_dir, record, resume=resume)
    device = resolve_device(settings.device)
    torch.manual_seed(settings.seed)
    config = settings.model_config(classes)
    train = yield from _prepare(cohort, "train", settings, tissue)
    val = yield from _prepare(cohort, "val", settings, tissue)
    if not train:
        raise ValueError("the cohort's training split has no slide with tissue")
    present = sorted({s.label for s in train})
    if len(present) < 2:
        raise ValueError(f"the training slides hold only class(es) {[classes[c] for c in present]}")
    model = DualAttention(config)
    if init is not None:
        load_init(model, init, config.kind, classes)
    else:
        rng = np.random.default_rng([settings.seed, 10**6])
        mean, std = tissue_statistics(_normalisation_tiles(train, settings, rng))
        model.set_normalisation(mean, std)
    model = on_device(model, device)
    counts = np.bincount([s.label for s in train], minlength=len(classes)).astype(float)
    weights = class_weights(settings.class_weights, counts, device)
    soft_params = [*model.soft.parameters(), *model.features.parameters(), *model.head.parameters()]
    groups = []
    if settings.mode in ("joint", "soft"):
        groups.append({"params": soft_params, "lr_scale": settings.lr_soft / settings.lr})
    if settings.mode in ("joint", "hard"):
        groups.append({"params": list(model.hard.parameters()), "lr_scale": 1.0})
    optimizer = torch.optim.Adam(groups, lr=settings.lr, weight_decay=settings.weight_decay)
    yield from run.restore(model, optimizer, settings.epochs)
    hard_px = model.hard.config.tile_px
    n_soft = settings.soft_samples or config.n_tiles

    def soft_part(
        item: _SlideData, slide: Slide, rng: np.random.Generator, augment: bool = settings.augment
    ):
        out = model.attend(
            torch.from_numpy(item.view.image)[None].to(device),
            torch.from_numpy(item.view.tissue)[None].to(device),
        )
        n_cells = int(out.tissue.sum())
        flat = out.attention.flatten(1)  # (1, P)
        gen = torch.Generator(device="cpu").manual_seed(int(rng.integers(2**31)))
        idx = sample_without_replacement(flat.detach().cpu(), min(n_soft, n_cells), generator=gen)
        width = out.attention.shape[-1]
        cells = np.stack([idx[0].numpy() // width, idx[0].numpy() % width], 1)
        boxes = _cell_boxes(cells, config.cell_px, item.tile_px, item.size)
        tiles = read_tiles(slide, boxes, config.feature_px)
        if augment:
            tiles = _augment(tiles, rng)
        x = model.prepare(torch.from_numpy(tiles), config.feature_px).to(device)
        label = torch.tensor([item.label], device=device)
        return model.soft_loss(out, x, idx.to(device), label, weights), out

    def train_epoch(
        epoch: int, rng: np.random.Generator, lr: float
    ) -> Generator[Progress, None, dict[str, Any]]:
        model.train()
        steps = _mixed_steps([s.label for s in train], settings.slides_per_step, rng)
        alpha = model.joint_weight(epoch)
        losses, soft_losses, hard_losses, correct, seen = [], [], [], 0, 0
        for k, step in enumerate(steps):
            optimizer.zero_grad(set_to_none=True)
            soft_total = torch.zeros((), device=device)
            hard_tiles, hard_labels = [], []
            for index in step:
                item = train[index]
                with open_slide(item.slide) as slide:
                    if settings.mode in ("joint", "soft"):
                        loss, _ = soft_part(item, slide, rng)
                        soft_total = soft_total + loss.total / len(step)
                    if settings.mode in ("joint", "hard"):
                        chosen = select_tiles(
                            model,
                            item.view,
                            item.size,
                            item.tile_px,
                            rng,
                            sampler=settings.sampler,
                            device=device,
                        )
                        tiles = read_tiles(slide, chosen.boxes, hard_px)
                        if settings.augment:
                            tiles = _augment(tiles, rng)
                        hard_tiles.append(tiles)
                        hard_labels += [item.label] * len(tiles)
            total = torch.zeros((), device=device)
            if settings.mode in ("joint", "soft"):
                total = total + (alpha if settings.mode == "joint" else 1.0) * soft_total
                soft_losses.append(float(soft_total.detach()))
            if hard_tiles:
                x = torch.from_numpy(np.concatenate(hard_tiles)).to(device)  # uint8
                labels = torch.tensor(hard_labels, device=device)
                episode = model.hard(x, sample=True)
                hard = hard_attention_loss(episode, labels, model.hard.config)
                total = total + hard.total
                hard_losses.append(float(hard.total.detach()))
                correct += int((episode.logits[:, -1].argmax(-1) == labels).sum())
                seen += len(labels)
            total.backward()
            optimizer.step()
            losses.append(float(total.detach()))
            yield Progress(
                "step",
                k + 1,
                len(steps),
                f"epoch {epoch + 1} step {k + 1}/{len(steps)}: loss {losses[-1]:.3f}",
                {"loss": losses[-1], "lr": lr},
            )
        row: dict[str, Any] = {"train_loss": float(np.mean(losses))}
        if soft_losses:
            row["soft_loss"] = float(np.mean(soft_losses))
        if hard_losses:
            row["hard_loss"] = float(np.mean(hard_losses))
            row["train_tile_accuracy"] = correct / max(seen, 1)
        if settings.mode == "joint":
            row["joint_weight"] = alpha  # α^e on L_SA this epoch
        return row

    def validate_soft() -> Metrics:
        """The soft attention's own call on the validation slides: its head on the
        expected features of tiles drawn from A (seeded, no augmentation)."""
        model.eval()
        rng = np.random.default_rng(settings.seed)
        truth, probs = [], []
        with torch.no_grad():
            for item in val:
                with open_slide(item.slide) as slide:
                    loss, _ = soft_part(item, slide, rng, augment=False)
                truth.append(item.label)
                probs.append(torch.softmax(loss.logits[0].float(), -1).cpu().numpy())
        return evaluate(truth, probabilities=np.stack(probs).astype(np.float64), classes=classes)

    def validate():
        if not val:
            return None
        if settings.mode == "soft":
            metrics = validate_soft()
        else:
            metrics = evaluate_dual(
                model, val, classes, device, sampler=settings.sampler, seed=settings.seed
            )
        model.train()
        return (
            {
                "val_mean_f1": metrics.mean.f1,
                "val_accuracy": metrics.accuracy,
                "val_auroc": metrics.auroc,
            },
            metrics.mean.f1,
        )

    extra = run.checkpoint_extra(record["cohort"], settings, None)
    extra["sampler"] = settings.sampler
    stopped = yield from run_epochs(
        run, settings, model, optimizer, train_epoch, validate, extra, "val mean F1"
    )
    return run.summary(stopped)


def _normalisation_tiles(
    train: list[_SlideData], settings: DualTrainSettings, rng: np.random.Generator
):
    """Tiles at random tissue cells of the training slides (for the mean and std)."""
    for item in train:
        rows, cols = np.nonzero(item.view.tissue)
        pick = rng.choice(len(rows), size=min(settings.normalise_tiles, len(rows)), replace=False)
        pixels = np.stack([rows[pick], cols[pick]], 1)  # view px as (1 x 1) cells
        boxes = _cell_boxes(pixels, item.view.downsample, item.tile_px, item.size)
        with open_slide(item.slide) as slide:
            yield from read_tiles(slide, boxes, settings.feature_px)


# ----------------------------------------------------------------------------------------
# Inference


def predict_slide_dual(
    model: DualAttention | str | os.PathLike,
    slide: Slide | str | os.PathLike,
    *,
    device: str | torch.device | None = "auto",
    sampler: str = "attention",
    seed: int = 0,
    tissue: TissueParams | None = None,
    mpp: float | None = None,
    amp: bool | None = None,
    **_ignored: Any,
) -> Generator[Progress, None, SlideResult]:
    """Run a dual attention model on a slide.

    The soft attention over the x32 view, the N tiles its sampling picks (with the
    training's noise, drawn from ``seed`` so a run is repeatable), T glimpses per tile
    with the policy's mean locations; the slide's class is the most frequent tile class.

    Args:
        model: a ``DualAttention`` or a checkpoint path.
        slide: an opened slide or its path.
        device: "auto", "cpu", "cuda".
        sampler: "attention" or "random" (the baseline's tiles).
        seed: the sampling noise and the first glimpses.
        tissue: tissue detection settings.
        mpp: pixel size override for slides without one.
        amp: unused (the dual model is small; it runs in fp32).

    Yields:
        Progress: "tissue", "attention", "tiles" (data: the tile boxes), "glimpses".

    Returns:
        The ``SlideResult``: slide-level arrays ``soft_attention`` (h', w') and
        ``soft_tissue``, ``tile_boxes`` (N, 4), ``tile_attention``, ``tile_rank``,
        ``tile_classes``, ``tile_probabilities`` (N, K), ``glimpse_centres`` (N, T, 2)
        level-0 (x, y), ``glimpse_boxes`` (N, T, S, 4) level-0 (x, y, w, h) per
        magnification, ``glimpse_probabilities`` (N, T, K); ``info["soft_attention"]``
        gives the map's level-0 origin and cell size.
    """
    from ..inference import load_for_inference

    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    run = load_for_inference(
        model, device, False, DualAttention, "predict_slide_dual runs dual-attention models"
    )
    model, config = run.model, run.model.config
    own = not isinstance(slide, Slide)
    if own:
        slide = open_slide(slide, mpp=mpp)
    try:
        timings = {}
        t0 = time.perf_counter()
        yield Progress("tissue", 0, 1, f"finding tissue in {Path(slide.path).name}")
        view = read_view(slide, config.view_downsample, tissue=tissue)
        if not view.tissue.any():
            raise ValueError(
                f"{slide.path}: no tissue found in the x{config.view_downsample:g} view"
            )
        timings["view"] = time.perf_counter() - t0
        yield Progress("tissue", 1, 1, f"view {view.shape[1]}x{view.shape[0]} px")
        t0 = time.perf_counter()
        tile_px = tile_edge_px(slide, config.tile_um)
        chosen = select_tiles(
            model,
            view,
            slide.dimensions,
            tile_px,
            np.random.default_rng(seed),
            sampler=sampler,
            device=run.device,
        )
        timings["attention"] = time.perf_counter() - t0
        yield Progress(
            "attention",
            1,
            1,
            f"{len(chosen.boxes)} tiles sampled ({sampler})",
            {"tile_boxes": chosen.boxes},
        )
        t0 = time.perf_counter()
        hard = config.hard_config()
        tiles = read_tiles(slide, chosen.boxes, hard.tile_px)
        timings["read"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        tile_run = _run_hard(model, tiles, run.device, generator)
        timings["glimpses"] = time.perf_counter() - t0
        yield Progress("glimpses", len(tiles), len(tiles), f"{len(tiles)} tiles classified")
        probabilities, predicted = slide_call(tile_run.probabilities, config.risk)
        centres, boxes = glimpse_geometry(chosen.boxes, tile_run.locations, hard)
        timings["total"] = time.perf_counter() - run.start
        arrays = {
            "soft_attention": chosen.attention_map,
            "soft_tissue": chosen.tissue,
            "tile_boxes": chosen.boxes,
            "tile_attention": chosen.attention,
            "tile_rank": chosen.rank,
            "tile_classes": tile_run.probabilities.argmax(1).astype(np.int64),
            "tile_probabilities": tile_run.probabilities.astype(np.float32),
            "glimpse_centres": centres,
            "glimpse_boxes": boxes,
            "glimpse_probabilities": tile_run.step_probabilities.astype(np.float32),
        }
        return SlideResult(
            slide=str(slide.path),
            model_kind=config.kind,
            classes=config.classes,
            probabilities=probabilities,
            predicted=predicted,
            aggregation="most-frequent-tile-class",
            pieces=[],
            timings=timings,
            model={"checkpoint": run.checkpoint, "config": config.to_dict()},
            slide_info={
                "mpp": list(slide.mpp) if slide.mpp else None,
                "dimensions": list(slide.dimensions),
                "vendor": slide.vendor,
            },
            arrays=arrays,
            info={
                "device": str(run.device),
                "sampler": sampler,
                "seed": int(seed),
                "tiles": len(tiles),
                "tile_px": int(tile_px),
                "soft_attention": {"origin": [0, 0], "cell_size": chosen.cell_px},
                "glimpse_scales": list(hard.scales),
                "sampling_note": chosen.note,
            },
        )
    finally:
        if own:
            slide.close()


def glimpse_geometry(
    tile_boxes: np.ndarray, locations: np.ndarray, hard: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Glimpse centres and boxes in level-0 px.

    Args:
        tile_boxes: (N, 4) level-0 tile boxes.
        locations: (N, T, 2) glimpse centres in the tile's [-1, 1] (x, y) coordinates.
        hard: the hard attention's config (glimpse_px, scales, tile_px).

    Returns:
        centres (N, T, 2) float32 level-0 (x, y); boxes (N, T, S, 4) float32 level-0
        (x, y, w, h) of each magnification's glimpse.
    """
    tile_boxes = np.asarray(tile_boxes, dtype=np.float64).reshape(-1, 4)
    loc = np.asarray(locations, dtype=np.float64)
    x0, y0, w, h = (tile_boxes[:, i][:, None] for i in range(4))
    cx = x0 + (loc[..., 0] + 1) / 2 * w
    cy = y0 + (loc[..., 1] + 1) / 2 * h
    centres = np.stack([cx, cy], -1)  # (N, T, 2)
    per_px = w / hard.tile_px  # level-0 px per tile px, (N, 1)
    sides = np.stack([per_px * hard.glimpse_px * s for s in hard.scales], -1)  # (N, 1, S)
    side = np.broadcast_to(sides, (*cx.shape, len(hard.scales)))
    boxes = np.stack(
        [cx[..., None] - side / 2, cy[..., None] - side / 2, side, side], -1
    )  # (N, T, S, 4)
    return centres.astype(np.float32), boxes.astype(np.float32)
