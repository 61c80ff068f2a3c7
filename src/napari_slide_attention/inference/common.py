"""What every model kind's slide inference shares: loading the model onto its device,
opening the slide, finding its tissue pieces, reading each piece's tiles through the one
fast reader, progress events, and assembling the ``SlideResult``.

The kinds differ only in what they do with a piece's tiles (``inference/grid.py``,
``inference/sliding_window.py``) or, for the dual model, in how tiles are chosen
(``inference/dual.py``); ``inference.predict`` picks the kind from the model.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..jobs import Progress
from ..models.checkpoint import load_model
from ..models.device import default_amp, resolve_device
from ..results import PieceResult, SlideResult
from ..slide.reader import Slide, open_slide
from ..slide.sampling import (
    PieceSample,
    PieceTiles,
    piece_tiles,
    read_level_for,
    slide_pieces,
    tile_edge_px,
)
from ..slide.tissue import TissueParams, tissue_mask

__all__ = [
    "AGGREGATIONS",
    "LoadedModel",
    "aggregate",
    "load_model_for_inference",
    "opened",
    "predict_pieces",
    "slide_facts",
    "tiles_event",
]

AGGREGATIONS = ("highest-risk", "mean", "max")


def aggregate(
    piece_probabilities: Sequence[np.ndarray], rule: str, risk: Sequence[int]
) -> tuple[np.ndarray, int]:
    """The slide's probabilities and class from its pieces'.

    Args:
        piece_probabilities: (C,) per piece.
        rule: "highest-risk" (the paper: the slide takes the highest-risk class predicted
            for any piece, with that piece's probabilities), "mean" (mean probabilities)
            or "max" (per-class maximum, renormalised).
        risk: class indices from lowest to highest risk.
    """
    if rule not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {rule!r}; expected one of {AGGREGATIONS}")
    if not piece_probabilities:
        raise ValueError("no pieces to aggregate")
    probs = np.stack([np.asarray(p, dtype=np.float64) for p in piece_probabilities])
    if rule == "mean":
        slide = probs.mean(0)
        return slide.astype(np.float32), int(slide.argmax())
    if rule == "max":
        slide = probs.max(0)
        slide = slide / slide.sum()
        return slide.astype(np.float32), int(slide.argmax())
    rank = {c: i for i, c in enumerate(risk)}
    predicted = probs.argmax(1)
    top = max(predicted, key=lambda c: rank[int(c)])
    candidates = np.nonzero(predicted == top)[0]
    best = candidates[probs[candidates, top].argmax()]
    return probs[best].astype(np.float32), int(top)


@dataclass
class LoadedModel:
    """A model ready to run on slides (``load_model_for_inference``).

    Attributes:
        model: the model, in eval mode on ``device``.
        device: where it runs.
        amp: whether it runs under autocast.
        checkpoint: the checkpoint it was loaded from (None when given as a model).
        start: ``time.perf_counter()`` when loading began (the run's total time counts
            from there).
    """

    model: torch.nn.Module
    device: torch.device
    amp: bool
    checkpoint: str | None
    start: float

    @property
    def config(self) -> Any:
        """The model's config."""
        return self.model.config


def load_model_for_inference(
    model: torch.nn.Module | str | os.PathLike,
    device: str | torch.device | None,
    amp: bool | None,
    kind: str,
) -> LoadedModel:
    """A model (or the one in a checkpoint) in eval mode on its device, channels-last on
    CUDA, with the one autocast default (``models.device.default_amp``).

    Args:
        model: a model, or a checkpoint path to load one from.
        device: "auto", "cpu", "cuda", ... (see ``resolve_device``).
        amp: autocast; None = ``default_amp(device)``.
        kind: the model kind the caller runs ("grid-attention", ...).

    Raises:
        TypeError: the model is of another kind.
    """
    start = time.perf_counter()
    device = resolve_device(device)
    checkpoint_path = None
    if not isinstance(model, torch.nn.Module):
        checkpoint_path = str(model)
        model, _ = load_model(model, device)
    found = getattr(getattr(model, "config", None), "kind", type(model).__name__)
    if found != kind:
        raise TypeError(f"this runs {kind} models, got a {found} model")
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    use_amp = default_amp(device) if amp is None else bool(amp)
    return LoadedModel(model, device, use_amp, checkpoint_path, start)


@contextlib.contextmanager
def opened(slide: Slide | str | os.PathLike, mpp: float | None) -> Iterator[Slide]:
    """``with opened(slide, mpp) as s``: the slide itself, or the path opened (and closed
    at the end); a slide the models cannot read (grey, 16-bit, float, multichannel) is
    refused here, before any work, naming the file and what it is."""
    if isinstance(slide, Slide):
        slide.require_rgb()
        yield slide
        return
    with open_slide(slide, mpp=mpp) as own:
        own.require_rgb()
        yield own


def slide_facts(slide: Slide, **more: Any) -> dict[str, Any]:
    """The slide facts a result keeps (mpp, dimensions, vendor, and ``more``)."""
    return {
        "mpp": list(slide.mpp) if slide.mpp else None,
        "dimensions": list(slide.dimensions),
        "vendor": slide.vendor,
        **more,
    }


def tiles_event(done: int, total: int) -> Progress:
    """The "tiles" event every kind yields as tiles are read and classified."""
    return Progress("tiles", done, total, f"{done}/{total} tiles")


# run_piece(sample, tiles) yields the number of tiles finished after each batch and
# returns (the PieceResult fields the model decides, the piece's class index).
RunPiece = Callable[[PieceSample, PieceTiles], Generator[int, None, tuple[dict[str, Any], int]]]
Finish = Callable[[list[PieceResult]], tuple[np.ndarray, int, str, dict[str, Any]]]


def predict_pieces(
    run: LoadedModel,
    slide: Slide | str | os.PathLike,
    tile_um: float,
    run_piece: RunPiece,
    finish: Finish,
    *,
    chunk_tiles: int = 64,
    tissue: TissueParams | None = None,
    min_tissue: float = 0.5,
    mpp: float | None = None,
    pieces: Sequence[PieceSample] | None = None,
) -> Generator[Progress, None, SlideResult]:
    """A slide's inference piece by piece, for the kinds that classify a tile grid.

    Args:
        run: the model ready to run (its ``config`` has ``classes``, ``kind``,
            ``input_px`` and ``to_dict``).
        slide: an opened slide or its path (a path is opened here and closed at the end).
        tile_um: the model's tile edge in micrometres.
        run_piece: see ``RunPiece``.
        finish: the pieces' results -> the slide's probabilities, class index,
            aggregation name and extra ``info`` entries.
        chunk_tiles: tiles per forward pass.
        tissue: tissue detection settings.
        min_tissue: tissue fraction a tile needs to be in the grid.
        mpp: pixel size override for slides without one.
        pieces: the samples to run (default: all tissue pieces of the slide).

    Yields:
        "tissue" (twice), "tiles" after every batch (done/total over the slide's tiles),
        "piece" per piece (data: "piece" holds the ``PieceResult``).

    Raises:
        ValueError: no piece of the slide has a tissue tile.
    """
    config = run.config
    timings = {"tissue": 0.0, "read_and_model": 0.0}
    with opened(slide, mpp) as slide:
        tile_px = tile_edge_px(slide, tile_um)
        level = read_level_for(slide, tile_px, config.input_px)
        yield Progress("tissue", 0, 1, f"finding tissue in {Path(slide.path).name}")
        t0 = time.perf_counter()
        if pieces is None:
            mask = tissue_mask(slide, tissue)
            pieces = slide_pieces(slide, tile_px, min_tissue=min_tissue, mask=mask)
        timings["tissue"] = time.perf_counter() - t0
        if not pieces:
            raise ValueError(f"{slide.path}: no tissue found (no piece has a tissue tile)")
        n_tiles = sum(p.n_tiles for p in pieces)
        yield Progress(
            "tissue",
            1,
            1,
            f"{len(pieces)} tissue piece(s), {n_tiles} tiles",
            {"pieces": len(pieces), "tiles": n_tiles},
        )
        results: list[PieceResult] = []
        done_tiles = 0
        for i, sample in enumerate(pieces):
            t0 = time.perf_counter()
            tiles = piece_tiles(slide, sample, level, chunk_tiles=chunk_tiles)
            work = run_piece(sample, tiles)
            while True:
                try:
                    done_tiles += next(work)
                except StopIteration as end:
                    fields, call = end.value
                    break
                yield tiles_event(done_tiles, n_tiles)
            info = fields.pop("info", {})
            piece = PieceResult(
                index=int(sample.piece),
                box=tuple(int(v) for v in sample.box),
                grid_origin=tuple(int(v) for v in sample.grid.origin),
                tile_size=int(sample.grid.tile_size),
                level=int(level),
                tissue=np.asarray(sample.grid.in_tissue, dtype=bool),
                info={"tiles": int(sample.n_tiles), "seconds": time.perf_counter() - t0, **info},
                **fields,
            )
            timings["read_and_model"] += time.perf_counter() - t0
            results.append(piece)
            yield Progress(
                "piece",
                i + 1,
                len(pieces),
                f"piece {sample.piece}: {config.classes[call]} "
                f"({piece.probabilities[call]:.0%}), {sample.n_tiles} tiles",
                {"piece": piece, "tiles_done": done_tiles, "tiles": n_tiles},
            )
        probabilities, predicted, aggregation, extra_info = finish(results)
        timings["total"] = time.perf_counter() - run.start
        return SlideResult(
            slide=str(slide.path),
            model_kind=config.kind,
            classes=config.classes,
            probabilities=probabilities,
            predicted=predicted,
            aggregation=aggregation,
            pieces=results,
            timings=timings,
            model={"checkpoint": run.checkpoint, "config": config.to_dict()},
            slide_info=slide_facts(slide, read_level=int(level)),
            info={
                "device": str(run.device),
                "amp": bool(run.amp),
                "tiles": int(n_tiles),
                "tile_px": int(tile_px),
                "tiles_per_second": n_tiles / max(timings["read_and_model"], 1e-9),
                **extra_info,
            },
        )
