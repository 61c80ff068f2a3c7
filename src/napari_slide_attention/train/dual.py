"""Training and running the dual attention model (Raza et al.) on a cohort.

``train_dual`` is a generator of ``Progress`` events returning a ``TrainSummary``, like
``train_grid``; the run directory, resume, checkpoints and logs are ``train/loop.py``'s.
Running a trained model on a slide is ``inference/dual.py``'s ``predict_dual``, whose
tile selection and glimpse steps the validation here uses too.

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
   ``tile_px``, rotated/flipped at random, each labelled with its slide's class (the
   paper) or, with ``tile_labels="regions"`` (our extension for sparse lesions), with the
   class of the region it overlaps, the lowest-risk class when it touches none
   (``train/tile_labels.py``); T glimpses per tile -> L_HA.

The step's loss is L_J = L_HA + α^e·L_SA ("joint"), L_SA ("soft") or L_HA ("hard"). Adam
with one learning rate per part (the paper: 1e-4 for the soft attention, 1e-3 for the
hard attention) and a step schedule (StepLR: ×``lr_gamma`` every ``lr_step`` epochs).

A slide's call: the most frequent tile class (ties go to the higher-risk class); its
probabilities are the mean tile probabilities, so the confidence is the mean tile
probability of that class (the paper's HER2 confidence). Tiles labelled from regions make
the model call a slide by the highest-risk class of any tile instead (``slide_call``
"highest-risk" in the model's config, set by ``tile_labels="regions"``).
"""

from __future__ import annotations

import os
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from ..inference.dual import SAMPLERS, select_tiles
from ..jobs import Progress
from ..models.device import resolve_device
from ..models.dual_attention import DualAttention, DualAttentionConfig
from ..models.hard_attention import hard_attention_loss
from ..models.sampling import sample_without_replacement
from ..slide.boxes import cell_boxes
from ..slide.reader import Slide, open_slide
from ..slide.sampling import read_tiles, tissue_statistics
from ..slide.tissue import TissueParams
from .cohort import Cohort
from .dual_data import (
    SlideData,
    augment_tiles,
    evaluate_dual,
    mixed_steps,
    normalisation_tiles,
    prepare_slides,
    selection_score,
    slide_scores,
)
from .loop import (
    RunDirectory,
    SettingsRecord,
    TrainSummary,
    class_weights,
    init_settings,
    load_init,
    on_device,
    run_epochs,
)
from .metrics import Metrics
from .tile_labels import TILE_LABELS, check_regions, region_tile_labels

__all__ = [
    "DualTrainSettings",
    "train_dual",
]

MODES = ("joint", "soft", "hard")
# A small dual model for a CPU and 0.5 µm/px slides, as ``DualTrainSettings.from_dict``
# values (the dual needle benchmark and the demo use it; why each value is what it is:
# ``benchmarks/dual_needle.py``): the x32 view with max-pooling 4 (attention cells of
# 128 level-0 px), 8 tiles of 128 µm read at 64 px for the soft attention's features and
# at 128 px for 4 glimpses of 32 px at two magnifications; β = 0.01; the soft attention
# at 1e-3 from 32 draws of A per slide.
CPU_PRESET: dict[str, Any] = {
    "lr_soft": 1e-3,
    "soft_samples": 32,
    "model": {
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
    },
}


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
        tile_labels: what a sampled tile is labelled with for the hard attention: "slide"
            (its slide's class, the paper) or "regions" (ours, for sparse lesions: the
            highest-risk class of the region boxes it overlaps, the lowest-risk class
            when it touches none; the regions are the cohort's lesion boxes, replaced by
            a label store's regions with ``train --labels``). "regions" sets the model's
            ``slide_call`` to "highest-risk".
        slides_per_step: slides per optimiser step (the paper: four, of four classes).
        soft_samples: cells drawn from A per slide for the soft attention's loss (None: N).
        model: the model's settings (``DualAttentionConfig``'s view_downsample, soft,
            n_tiles, candidates, min_distance, refine, noise, tile_um, feature_px,
            feature_width, hard, joint_alpha); the config's defaults, the paper's, fill
            what is not given.
        augment: random quarter turns and flips of the tiles.
        class_weights: "balanced" (inverse class frequency of the training slides) or
            "none", for the classification losses.
        normalise_tiles: tiles per training slide for the normalisation statistics.
        device: "auto", "cpu", "cuda".
        seed: random seed.
        max_hours: stop after the epoch that passes this many hours (0 = no limit).
        weights, calibrate_bn: unused by this model (kept for the shared loop).
    """

    model_type: ClassVar[type] = DualAttentionConfig
    # the slide call follows the tiles' labels of the latest training, not the base's
    fine_tunable: ClassVar[tuple[str, ...]] = ("slide_call",)

    epochs: int = 100
    lr: float = 1e-3
    lr_soft: float = 1e-4
    lr_step: int = 30
    lr_gamma: float = 0.5
    weight_decay: float = 0.0
    mode: str = "joint"
    sampler: str = "attention"
    tile_labels: str = "slide"
    slides_per_step: int = 4
    soft_samples: int | None = None
    augment: bool = True
    class_weights: str = "balanced"
    normalise_tiles: int = 16
    device: str = "auto"
    seed: int = 0
    max_hours: float = 0.0
    weights: str | None = None
    calibrate_bn: bool | None = None
    model: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_model()
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
        if self.tile_labels not in TILE_LABELS:
            raise ValueError(f"tile_labels must be one of {TILE_LABELS}, got {self.tile_labels!r}")
        if self.tile_labels == "regions":
            # region-labelled tiles show a lesion's class or the lowest-risk one: the slide
            # takes the highest-risk class of its tiles, not the most frequent
            self.model["slide_call"] = "highest-risk"
        if self.class_weights not in ("balanced", "none"):
            raise ValueError("class_weights must be 'balanced' or 'none'")
        if self.weights:
            raise ValueError("the dual model takes no pretrained trunk weights (use --init)")

    def learning_rate(self, epoch: int) -> float:
        """StepLR: lr · gamma^(epoch // step) (the soft part runs at lr_soft / lr of it)."""
        return self.lr * self.lr_gamma ** (epoch // self.lr_step)


# ----------------------------------------------------------------------------------------
# Training


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
        init: start from this dual-attention checkpoint (its weights, normalisation,
            model settings and class names, which must equal the cohort's): e.g. train
            the soft attention first (mode "soft"), then the hard attention on its tiles
            (mode "hard").

    Yields:
        Progress: "prepare" per slide, "step" per optimiser step, "epoch" per epoch.

    Returns:
        The summary with the paths of the best and last checkpoints.
    """
    settings = settings or DualTrainSettings()
    if init is not None:  # the checkpoint decides the model's shape
        settings = init_settings(settings, init)
    classes = cohort.classes
    record = {
        "settings": settings.to_dict(),
        "classes": list(classes),
        "cohort": str(cohort.path) if cohort.path else None,
        "init": str(init) if init else None,
    }
    run = RunDirectory(run_dir, record, resume=resume, settings_type=DualTrainSettings)
    device = resolve_device(settings.device)
    torch.manual_seed(settings.seed)
    config = settings.model_config(classes)
    train = yield from prepare_slides(cohort, "train", settings, tissue)
    val = yield from prepare_slides(cohort, "val", settings, tissue)
    if not train:
        raise ValueError("the cohort's training split has no slide with tissue")
    if settings.tile_labels == "regions":
        check_regions([(s.slide, s.label, s.regions) for s in train], classes, config.risk[0])
    present = sorted({s.label for s in train})
    if len(present) < 2:
        raise ValueError(f"the training slides hold only class(es) {[classes[c] for c in present]}")
    model = DualAttention(config)
    if init is not None:
        load_init(model, init, config.kind, classes)
    else:
        rng = np.random.default_rng([settings.seed, 10**6])
        mean, std = tissue_statistics(normalisation_tiles(train, settings, rng))
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
    risk = config.risk

    def soft_draw(item: SlideData, slide: Slide, rng: np.random.Generator, training: bool = True):
        """A's output on a slide's view, the cells drawn from it and their prepared tiles."""
        gen = torch.Generator(device="cpu").manual_seed(int(rng.integers(2**31)))
        out = model.attend(
            torch.from_numpy(item.view.image)[None].to(device),
            torch.from_numpy(item.view.tissue)[None].to(device),
            # top-k: training draws the k cells from A, so cells outside its top k are tried
            explore=gen if training and model.soft.config.top_k else None,
        )
        flat = out.attention.flatten(1)  # (1, P)
        n_cells = int((flat > 0).sum())  # the tissue cells, or A's k with top-k
        idx = sample_without_replacement(flat.detach().cpu(), min(n_soft, n_cells), generator=gen)
        width = out.attention.shape[-1]
        cells = np.stack([idx[0].numpy() // width, idx[0].numpy() % width], 1)
        boxes = cell_boxes(cells, config.cell_px, item.tile_px, item.size)
        tiles = read_tiles(slide, boxes, config.feature_px)
        if training and settings.augment:
            tiles = augment_tiles(tiles, rng)
        x = model.prepare(torch.from_numpy(tiles), config.feature_px).to(device)
        return out, idx.to(device), x

    def soft_step(draws: list, labels: list[int]):
        """L_SA of a step's slides, their tiles one batch through the feature network."""
        outs, idx, tiles = zip(*draws, strict=True)
        return model.soft_losses(outs, tiles, idx, torch.tensor(labels, device=device), weights)

    def train_epoch(
        epoch: int, rng: np.random.Generator, lr: float
    ) -> Generator[Progress, None, dict[str, Any]]:
        model.train()
        steps = mixed_steps([s.label for s in train], settings.slides_per_step, rng)
        alpha = model.joint_weight(epoch)
        losses, soft_losses, hard_losses, correct, seen = [], [], [], 0, 0
        tile_classes = np.zeros(len(classes), dtype=np.int64)
        for k, step in enumerate(steps):
            optimizer.zero_grad(set_to_none=True)
            hard_tiles, hard_labels, soft_draws = [], [], []
            for index in step:
                item = train[index]
                with open_slide(item.slide, mpp=item.mpp) as slide:
                    if settings.mode in ("joint", "soft"):
                        soft_draws.append(soft_draw(item, slide, rng))
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
                            tiles = augment_tiles(tiles, rng)
                        hard_tiles.append(tiles)
                        if settings.tile_labels == "regions":
                            labels = region_tile_labels(chosen.boxes, item.regions or (), risk)
                            hard_labels += labels.tolist()
                        else:
                            hard_labels += [item.label] * len(tiles)
            total = torch.zeros((), device=device)
            if soft_draws:
                step_losses = soft_step(soft_draws, [train[i].label for i in step])
                soft_total = torch.stack([loss.total for loss in step_losses]).mean()
                total = total + (alpha if settings.mode == "joint" else 1.0) * soft_total
                soft_losses.append(float(soft_total.detach()))
            if hard_tiles:
                x = torch.from_numpy(np.concatenate(hard_tiles)).to(device)  # uint8
                labels = torch.tensor(hard_labels, device=device)
                tile_classes += np.bincount(hard_labels, minlength=len(classes))
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
            # how many training tiles carried each class (from regions: the lesions hit)
            row["train_tile_labels"] = dict(zip(classes, tile_classes.tolist(), strict=True))
        if settings.mode == "joint":
            row["joint_weight"] = alpha  # α^e on L_SA this epoch
        return row

    def validate_soft() -> tuple[Metrics, float]:
        """The soft attention's own call on the validation slides: its head on the
        expected features of tiles drawn from A (seeded, no augmentation)."""
        model.eval()
        rng = np.random.default_rng(settings.seed)
        truth, probs = [], []
        with torch.no_grad():
            for item in val:
                with open_slide(item.slide, mpp=item.mpp) as slide:
                    (loss,) = soft_step([soft_draw(item, slide, rng, training=False)], [item.label])
                truth.append(item.label)
                probs.append(torch.softmax(loss.logits[0].float(), -1).cpu().numpy())
        return slide_scores(truth, np.stack(probs), classes)

    def validate():
        if not val:
            return None
        if settings.mode == "soft":
            metrics, loss = validate_soft()
        else:
            metrics, loss = evaluate_dual(
                model, val, classes, device, sampler=settings.sampler, seed=settings.seed
            )
        model.train()
        return (
            {
                "val_mean_f1": metrics.mean.f1,
                "val_accuracy": metrics.accuracy,
                "val_auroc": metrics.auroc,
                "val_loss": loss,
            },
            selection_score(metrics.mean.f1, loss),
        )

    extra = run.checkpoint_extra(record["cohort"], settings, None)
    extra["sampler"] = settings.sampler
    stopped = yield from run_epochs(
        run, settings, model, optimizer, train_epoch, validate, extra, "val mean F1"
    )
    return run.summary(stopped)
