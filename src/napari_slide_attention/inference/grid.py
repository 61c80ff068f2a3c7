"""Grid-attention inference (Tomita et al.): every tissue tile of each piece embedded,
the 64 attention maps over the piece's grid, the piece's class; the pieces' calls
aggregated into the slide's."""

from __future__ import annotations

import os
from collections.abc import Generator, Sequence
from typing import Any

import numpy as np
import torch

from ..jobs import Progress
from ..models.device import Autocast
from ..models.grid_attention import cells_to_grid
from ..results import PieceResult, SlideResult
from ..slide.reader import Slide
from ..slide.sampling import PieceSample, PieceTiles
from ..slide.tissue import TissueParams
from .common import AGGREGATIONS, aggregate, load_model_for_inference, predict_pieces

__all__ = ["predict_grid"]


def predict_grid(
    model: torch.nn.Module | str | os.PathLike,
    slide: Slide | str | os.PathLike,
    *,
    device: str | torch.device | None = "auto",
    amp: bool | None = None,
    tissue: TissueParams | None = None,
    mpp: float | None = None,
    chunk_tiles: int = 64,
    min_tissue: float = 0.5,
    aggregation: str = "highest-risk",
    pieces: Sequence[PieceSample] | None = None,
) -> Generator[Progress, None, SlideResult]:
    """Run a grid-attention model on a slide, piece by piece.

    Args:
        model: a ``GridAttention`` (or a checkpoint path to load one from).
        slide: an opened slide or its path.
        device: "auto", "cpu", "cuda", ...
        amp: autocast; None = ``models.device.default_amp``.
        tissue: tissue detection settings.
        mpp: pixel size override for slides without one.
        chunk_tiles: tiles per forward pass.
        min_tissue: tissue fraction a tile needs to be in the grid.
        aggregation: how pieces make the slide's call (see ``aggregate``).
        pieces: the samples to run (default: all tissue pieces of the slide).

    Yields:
        Progress events: "tissue", "tiles" after every batch, one "piece" per piece
        (data: "piece" holds the PieceResult).

    Returns:
        The slide's result.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
    run = load_model_for_inference(model, device, amp, "grid-attention")
    model, config = run.model, run.config
    autocast = Autocast(run.device, run.amp)

    def run_piece(
        sample: PieceSample, tiles: PieceTiles
    ) -> Generator[int, None, tuple[dict[str, Any], int]]:
        """A piece's probabilities, attention maps, scores and map contributions."""
        parts = []
        batches = iter(tiles)
        while True:
            # grad mode is thread state: keep no_grad off while suspended at a yield
            with torch.no_grad():
                batch = next(batches, None)
                if batch is None:
                    break
                chunk = torch.from_numpy(batch)
                parts.extend(model.embed_chunks([chunk], run.device, autocast))
            yield len(chunk)
        cells = torch.from_numpy(tiles.cells)
        with torch.no_grad():
            out = model.attend_features(torch.cat(parts), cells, tiles.shape)
            arrays = {}
            if not config.hidden:
                u, _ = cells_to_grid(out.features, cells.to(out.features.device), tiles.shape)
                contributions = model.map_contributions(u, out.maps[None].float())[0]
                arrays["map_contributions"] = contributions.float().cpu().numpy()  # (C, m)
        probs = torch.softmax(out.logits.float(), 0).cpu().numpy()
        scores = out.scores.float().cpu().numpy()
        scores[~np.isfinite(scores)] = np.nan
        fields = {
            "probabilities": probs,
            "maps": out.maps.float().cpu().numpy(),
            "scores": scores,
            "arrays": arrays,
        }
        return fields, int(np.argmax(probs))

    def finish(results: list[PieceResult]) -> tuple[np.ndarray, int, str, dict[str, Any]]:
        """The pieces' probabilities aggregated by ``aggregation``."""
        probabilities, predicted = aggregate(
            [p.probabilities for p in results], aggregation, config.risk
        )
        return probabilities, predicted, aggregation, {}

    return (
        yield from predict_pieces(
            run,
            slide,
            config.tile_um,
            run_piece,
            finish,
            chunk_tiles=chunk_tiles,
            tissue=tissue,
            min_tissue=min_tissue,
            mpp=mpp,
            pieces=pieces,
        )
    )
