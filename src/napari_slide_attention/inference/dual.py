"""Dual-attention inference (Raza et al.): the soft attention over the slide's low-power
view, the tiles its sampling picks, T glimpses per tile by the recurrent hard-attention
model; the slide's class is the most frequent tile class and its confidence the mean tile
probability of that class (the paper's HER2 confidence). A model whose tiles were
labelled from regions (``slide_call`` "highest-risk", our extension) calls the slide by
the highest-risk class predicted for any tile instead.

``select_tiles``, ``run_hard`` and ``slide_call`` are the steps, which training's
validation uses too, so a validated model and a predicting one choose tiles alike.
"""

from __future__ import annotations

import os
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..jobs import Progress
from ..models.device import Autocast
from ..models.dual_attention import DualAttention
from ..models.sampling import random_tiles, sample_tiles
from ..results import SlideResult
from ..slide.reader import Slide
from ..slide.sampling import SlideView, read_tiles, read_view, tile_edge_px
from ..slide.tissue import TissueParams
from .common import aggregate, load_model_for_inference, opened, slide_facts, tiles_event

__all__ = [
    "SAMPLERS",
    "TileRun",
    "TileSelection",
    "glimpse_geometry",
    "predict_dual",
    "run_hard",
    "select_tiles",
    "slide_call",
]

SAMPLERS = ("attention", "random")


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


AGGREGATION_NAMES = {
    "most-frequent": "most-frequent-tile-class",
    "highest-risk": "highest-risk-tile-class",
}


def slide_call(
    tile_probabilities: np.ndarray, risk: Sequence[int], rule: str = "most-frequent"
) -> tuple[np.ndarray, int]:
    """The slide's probabilities and class from its tiles'.

    Args:
        tile_probabilities: (N, K) per tile.
        risk: class indices from lowest to highest risk.
        rule: "most-frequent" (the paper: the most frequent tile class, ties to the
            higher risk; the probabilities are the mean over tiles) or "highest-risk"
            (the highest-risk class predicted for any tile, with the probabilities of the
            tile most sure of it: ``inference.common.aggregate``'s rule for pieces).
    """
    if rule == "highest-risk":
        return aggregate(list(np.asarray(tile_probabilities)), "highest-risk", risk)
    if rule != "most-frequent":
        raise ValueError(f"unknown slide call {rule!r}; expected most-frequent or highest-risk")
    probs = np.asarray(tile_probabilities, dtype=np.float64)
    mean = probs.mean(0)
    votes = np.bincount(probs.argmax(1), minlength=probs.shape[1])
    rank = {c: i for i, c in enumerate(risk)}
    top = max(range(len(votes)), key=lambda c: (votes[c], rank[c]))
    return (mean / mean.sum()).astype(np.float32), int(top)


@dataclass(frozen=True)
class TileRun:
    """What the hard attention made of a slide's tiles.

    Attributes:
        probabilities: (N, K) the final step's class probabilities.
        step_probabilities: (N, T, K) every step's.
        locations: (N, T, 2) glimpse centres in the tile's [-1, 1] (x, y).
    """

    probabilities: np.ndarray
    step_probabilities: np.ndarray
    locations: np.ndarray


def run_hard(
    model: DualAttention,
    tiles: np.ndarray,
    device: torch.device,
    generator: torch.Generator | None,
    *,
    amp: bool | None = None,
    chunk: int = 1,
) -> Generator[int, None, TileRun]:
    """The hard attention on tiles (the policy's mean locations; the random first glimpse
    drawn from ``generator``), ``chunk`` tiles at a time.

    Yields:
        The number of tiles finished after each chunk.

    Returns:
        The glimpses and class probabilities of every tile.
    """
    autocast = Autocast(device, amp)
    probs, steps, locs = [], [], []
    for i in range(0, len(tiles), chunk):
        # grad mode is thread state: keep no_grad off while suspended at a yield
        with torch.no_grad(), autocast():
            # uint8 tiles as in training: the hard attention normalises its own glimpses
            x = torch.from_numpy(tiles[i : i + chunk]).to(device)
            episode = model.hard(x, sample=False, generator=generator)
            p = torch.softmax(episode.logits.float(), -1)  # (B, T, K)
        probs.append(p[:, -1].cpu().numpy())
        steps.append(p.cpu().numpy())
        locs.append(episode.locations.float().cpu().numpy())
        yield len(x)
    k = len(model.config.classes)
    t = model.hard.config.glimpses
    if not probs:
        return TileRun(np.zeros((0, k)), np.zeros((0, t, k)), np.zeros((0, t, 2)))
    return TileRun(np.concatenate(probs), np.concatenate(steps), np.concatenate(locs))


def predict_dual(
    model: DualAttention | str | os.PathLike,
    slide: Slide | str | os.PathLike,
    *,
    device: str | torch.device | None = "auto",
    amp: bool | None = None,
    tissue: TissueParams | None = None,
    mpp: float | None = None,
    sampler: str = "attention",
    seed: int = 0,
) -> Generator[Progress, None, SlideResult]:
    """Run a dual attention model on a slide.

    The soft attention over the x32 view, the N tiles its sampling picks (with the
    training's noise, drawn from ``seed`` so a run is repeatable), T glimpses per tile
    with the policy's mean locations; the slide's class is the most frequent tile class.

    Args:
        model: a ``DualAttention`` or a checkpoint path.
        slide: an opened slide or its path.
        device: "auto", "cpu", "cuda".
        amp: autocast; None = ``models.device.default_amp``.
        tissue: tissue detection settings.
        mpp: pixel size override for slides without one.
        sampler: "attention" or "random" (the baseline's tiles).
        seed: the sampling noise and the first glimpses.

    Yields:
        Progress: "tissue", "attention" (data: the tile boxes), "tiles" after each tile's
        glimpses.

    Returns:
        The ``SlideResult``: slide-level arrays ``soft_attention`` (h', w') and
        ``soft_tissue``, ``tile_boxes`` (N, 4), ``tile_attention``, ``tile_rank``,
        ``tile_classes``, ``tile_probabilities`` (N, K), ``glimpse_centres`` (N, T, 2)
        level-0 (x, y), ``glimpse_boxes`` (N, T, S, 4) level-0 (x, y, w, h) per
        magnification, ``glimpse_probabilities`` (N, T, K); ``info["soft_attention"]``
        gives the map's level-0 origin and cell size.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    run = load_model_for_inference(model, device, amp, "dual-attention")
    model, config = run.model, run.config
    with opened(slide, mpp) as slide:
        tile_px = tile_edge_px(slide, config.tile_um)  # a wrong mpp fails here, not later
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
        n = len(chosen.boxes)
        yield Progress(
            "attention", 1, 1, f"{n} tiles sampled ({sampler})", {"tile_boxes": chosen.boxes}
        )
        t0 = time.perf_counter()
        hard = config.hard_config()
        tiles = read_tiles(slide, chosen.boxes, hard.tile_px)
        timings["read"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        work = run_hard(model, tiles, run.device, generator, amp=run.amp)
        done = 0
        while True:
            try:
                done += next(work)
            except StopIteration as end:
                tile_run = end.value
                break
            yield tiles_event(done, n)
        timings["glimpses"] = time.perf_counter() - t0
        probabilities, predicted = slide_call(
            tile_run.probabilities, config.risk, config.slide_call
        )
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
            aggregation=AGGREGATION_NAMES[config.slide_call],
            pieces=[],
            timings=timings,
            model={"checkpoint": run.checkpoint, "config": config.to_dict()},
            slide_info=slide_facts(slide),
            arrays=arrays,
            info={
                "device": str(run.device),
                "amp": bool(run.amp),
                "sampler": sampler,
                "seed": int(seed),
                "tiles": n,
                "tile_px": int(tile_px),
                "soft_attention": {"origin": [0, 0], "cell_size": chosen.cell_px},
                "glimpse_scales": list(hard.scales),
                "sampling_note": chosen.note,
            },
        )


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
