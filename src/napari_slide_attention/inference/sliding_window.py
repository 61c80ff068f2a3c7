"""Sliding-window baseline inference: every tissue tile of each piece classified on the
slide-wide tile grid (as the grid-attention model's), the tiles turned into the slide's
call by the tuned thresholds rule (Tomita et al.'s baseline) or the top-15 mean (Raza et
al.'s)."""

from __future__ import annotations

import os
from collections.abc import Generator, Sequence
from typing import Any

import numpy as np
import torch

from ..jobs import Progress
from ..models.device import Autocast
from ..models.sliding_window import SlidingWindowConfig, aggregate_tiles
from ..results import PieceResult, SlideResult
from ..slide.reader import Slide
from ..slide.sampling import PieceSample, PieceTiles
from ..slide.tissue import TissueParams
from .common import load_model_for_inference, predict_pieces

__all__ = ["SLIDE_AGGREGATIONS", "predict_sliding_window", "tile_probabilities", "top_k_mean"]

SLIDE_AGGREGATIONS = ("thresholds", "top-k-mean")


def predict_sliding_window(
    model: torch.nn.Module | str | os.PathLike,
    slide: Slide | str | os.PathLike,
    *,
    device: str | torch.device | None = "auto",
    amp: bool | None = None,
    tissue: TissueParams | None = None,
    mpp: float | None = None,
    chunk_tiles: int = 64,
    min_tissue: float = 0.5,
    aggregation: str = "thresholds",
    top_k: int = 15,
    pieces: Sequence[PieceSample] | None = None,
) -> Generator[Progress, None, SlideResult]:
    """Run the sliding-window baseline on a slide, piece by piece.

    Every tissue tile of each piece (on the slide-wide tile grid, as the grid-attention
    model's) is classified; ``aggregate_tiles`` with the model's thresholds turns a
    piece's tiles into the piece's call, and all tiles of the slide into the slide's.

    Args:
        model: a ``CropClassifier`` (or a checkpoint path to load one from).
        slide: an opened slide or its path.
        device: "auto", "cpu", "cuda", ...
        amp: autocast; None = ``models.device.default_amp``.
        tissue: tissue detection settings.
        mpp: pixel size override for slides without one.
        chunk_tiles: tiles per forward pass.
        min_tissue: tissue fraction a tile needs to be classified.
        aggregation: "thresholds" (the rule tuned on the validation split, Tomita et
            al.'s baseline) or "top-k-mean" (Raza et al.'s baseline: per class the mean of
            the ``top_k`` highest tile probabilities, renormalised; the class with the
            highest).
        top_k: tiles per class for "top-k-mean" (the paper: 15).
        pieces: the samples to run (default: all tissue pieces of the slide).

    Yields:
        Progress events: "tissue", "tiles" after every batch, one "piece" per piece
        (data: "piece" holds the PieceResult, whose ``arrays["tile_probabilities"]`` is
        (C, H', W') float32, NaN off tissue, and whose ``info["call"]`` is the rule's
        class index).

    Returns:
        The slide's result (aggregation "thresholds" or "top-15-mean").
    """
    if aggregation not in SLIDE_AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {SLIDE_AGGREGATIONS}, got {aggregation!r}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    run = load_model_for_inference(model, device, amp, "sliding-window")
    model, config = run.model, run.config
    autocast = Autocast(run.device, run.amp)
    n_classes = len(config.classes)
    every_tile: list[np.ndarray] = []

    def run_piece(
        sample: PieceSample, tiles: PieceTiles
    ) -> Generator[int, None, tuple[dict[str, Any], int]]:
        """A piece's tile probabilities and the rule's call on them."""
        parts = []
        for batch in tiles:
            parts.append(model.probabilities(torch.from_numpy(batch), run.device, autocast))
            yield len(batch)
        probs = torch.cat(parts).numpy()  # (N, C)
        shape = tiles.shape
        grid = np.full((n_classes, shape[0] * shape[1]), np.nan, dtype=np.float32)
        grid[:, tiles.cells] = probs.T
        grid = grid.reshape(n_classes, *shape)  # (C, H', W')
        piece_probs, call = aggregate_tiles(
            probs, config.thresholds, config.min_counts, config.risk
        )
        every_tile.append(probs)
        fields = {
            "probabilities": piece_probs,
            "arrays": {"tile_probabilities": grid},
            "info": {"call": int(call), "tiles_over_threshold": _over_threshold(probs, config)},
        }
        return fields, call

    def finish(results: list[PieceResult]) -> tuple[np.ndarray, int, str, dict[str, Any]]:
        """The rule on all the slide's tiles."""
        tiles = np.concatenate(every_tile)  # (N, C) over the whole slide
        info = {"tiles_over_threshold": _over_threshold(tiles, config)}
        if aggregation == "top-k-mean":
            probabilities, predicted = top_k_mean(tiles, top_k)
            return probabilities, predicted, f"top-{top_k}-mean", info
        probabilities, predicted = aggregate_tiles(
            tiles, config.thresholds, config.min_counts, config.risk
        )
        return probabilities, predicted, "thresholds", info

    return (
        yield from predict_pieces(
            run,
            slide,
            config.crop_um,
            run_piece,
            finish,
            chunk_tiles=chunk_tiles,
            tissue=tissue,
            min_tissue=min_tissue,
            mpp=mpp,
            pieces=pieces,
        )
    )


def tile_probabilities(result: SlideResult) -> np.ndarray:
    """(N, C) probabilities of a sliding-window result's tissue tiles, piece by piece,
    row-major."""
    parts = [
        piece.arrays["tile_probabilities"][:, piece.tissue].T  # (n, C)
        for piece in result.pieces
    ]
    return np.concatenate(parts) if parts else np.zeros((0, len(result.classes)), np.float32)


def top_k_mean(tile_probabilities: np.ndarray, k: int = 15) -> tuple[np.ndarray, int]:
    """Raza et al.'s sliding-window slide score: per class the mean of its ``k`` highest
    tile probabilities (all tiles when fewer), renormalised to sum to 1; the slide's class
    is the highest.

    Args:
        tile_probabilities: (N, C) tile class probabilities.
        k: tiles per class.
    """
    probs = np.asarray(tile_probabilities, dtype=np.float64)
    if probs.ndim != 2 or not len(probs):
        raise ValueError(f"need (N, C) tile probabilities with N >= 1, got shape {probs.shape}")
    top = -np.sort(-probs, axis=0)[: min(k, len(probs))]  # (k, C), highest first per class
    score = top.mean(0)
    score = score / score.sum()
    return score.astype(np.float32), int(score.argmax())


def _over_threshold(probs: np.ndarray, config: SlidingWindowConfig) -> dict[str, int]:
    """Per class above the lowest risk: tiles with p_k at or above its threshold."""
    return {
        config.classes[k]: int(np.count_nonzero(probs[:, k] >= config.thresholds[k]))
        for k in config.risk[1:]
    }
