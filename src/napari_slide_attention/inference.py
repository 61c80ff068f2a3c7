"""Whole-slide inference: ``predict_slide`` yields progress and returns a ``SlideResult``.

One code path for the CLI (progress bar), the GUI (thread worker) and tests
(``run_to_end``). The slide is cut into its tissue pieces; each piece's tiles are read
in chunks at the level closest to the model's input resolution while the model works
on the previous chunk; the pieces' results come out one by one (in the ``piece``
events' data, so a viewer can draw them as they arrive) and are aggregated into the
slide's call. ``load_for_inference`` and ``predict_pieces`` do all of that but the
model's own work on a piece and the aggregation, for ``predict_slide`` and the
sliding-window baseline's ``predict_slide_sliding_window`` alike.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .progress import Progress
from .results import PieceResult, SlideResult
from .slide.reader import Slide, open_slide
from .slide.tissue import TissueParams, tissue_mask
from .train.data import PieceSample, read_level_for, slide_pieces, tile_chunks, tile_edge_px

__all__ = ["AGGREGATIONS", "aggregate", "cpu_bf16_supported", "predict_slide", "resolve_device"]

AGGREGATIONS = ("highest-risk", "mean", "max")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """ "auto" -> CUDA when available, else CPU; other names as torch understands them.

    Raises:
        ValueError: CUDA asked for but not available.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA GPU here")
    return device


def cpu_bf16_supported() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), where bf16
    autocast speeds things up instead of emulating."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_amp(device: torch.device) -> bool:
    """Autocast by default on CUDA, and on CPUs with native bf16."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_bf16_supported())


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


def predict_slide(
    model: torch.nn.Module | str | os.PathLike,
    slide: Slide | str | os.PathLike,
    *,
    device: str | torch.device | None = "auto",
    chunk_tiles: int = 64,
    aggregation: str = "highest-risk",
    tissue: TissueParams | None = None,
    min_tissue: float = 0.5,
    amp: bool | None = None,
    mpp: float | None = None,
    pieces: Sequence[PieceSample] | None = None,
    on_tiles: Callable[[int], Any] | None = None,
) -> Generator[Progress, None, SlideResult]:
    """Run a grid-attention model on a slide, piece by piece.

    Args:
        model: a ``GridAttention`` (or a checkpoint path to load one from).
        slide: an opened slide or its path.
        device: "auto", "cpu", "cuda", ...
        chunk_tiles: tiles per forward pass.
        aggregation: how pieces make the slide's call (see ``aggregate``).
        tissue: tissue detection settings.
        min_tissue: tissue fraction a tile needs to be in the grid.
        amp: autocast (fp16/bf16 on CUDA, bf16 on CPU); None = where it is native.
        mpp: pixel size override for slides without one.
        pieces: the samples to run (default: all tissue pieces of the slide).
        on_tiles: called with the number of tiles after each chunk the model reads, so
            a caller follows progress inside a piece; an exception raised from it stops
            the run there (the GUI's Cancel, within one chunk).

    Yields:
        Progress events: "tissue", then one "piece" per piece (data: "piece" holds the
        PieceResult).

    Returns:
        The slide's result.
    """
    from .models.grid_attention import GridAttention, cells_to_grid

    run = load_for_inference(
        model, device, amp, GridAttention, "predict_slide runs grid-attention models"
    )
    model, config = run.model, run.model.config

    def run_piece(
        sample: PieceSample,
        chunks: Callable[[], Iterator[torch.Tensor]],
        cells: torch.Tensor,
        shape: tuple[int, int],
    ) -> tuple[dict[str, Any], int]:
        """A piece's probabilities, attention maps and scores (and map contributions)."""
        out = model.predict_chunks(chunks(), cells, shape, device=run.device, amp=run.amp)
        probs = torch.softmax(out.logits.float(), 0).cpu().numpy()
        arrays = {}
        if not config.hidden:
            with torch.no_grad():
                u, _ = cells_to_grid(out.features, cells.to(out.features.device), shape)
                contributions = model.map_contributions(u, out.maps[None].float())[0]
            arrays["map_contributions"] = contributions.float().cpu().numpy()  # (C, m)
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
            on_tiles=on_tiles,
        )
    )


@dataclass
class LoadedModel:
    """A model ready to run on slides (``load_for_inference``).

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


def load_for_inference(
    model: torch.nn.Module | str | os.PathLike,
    device: str | torch.device | None,
    amp: bool | None,
    kind: type[torch.nn.Module],
    refusal: str,
) -> LoadedModel:
    """A model (or the one in a checkpoint) in eval mode on its device, channels-last on
    CUDA, with the autocast choice.

    Args:
        model: a model, or a checkpoint path to load one from.
        device: "auto", "cpu", "cuda", ... (see ``resolve_device``).
        amp: autocast; None = where it is native (``default_amp``).
        kind: the model class the caller runs.
        refusal: the start of the ``TypeError`` message for a model of another class.

    Raises:
        TypeError: the model is not a ``kind``.
    """
    from .models.checkpoint import load_model

    start = time.perf_counter()
    device = resolve_device(device)
    checkpoint_path = None
    if not isinstance(model, torch.nn.Module):
        checkpoint_path = str(model)
        model, _ = load_model(model, device)
    if not isinstance(model, kind):
        raise TypeError(f"{refusal}, got {type(model).__name__}")
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    use_amp = default_amp(device) if amp is None else amp
    return LoadedModel(model, device, use_amp, checkpoint_path, start)


def _reporting(
    chunks: Callable[[], Iterator[torch.Tensor]], on_tiles: Callable[[int], Any]
) -> Callable[[], Iterator[torch.Tensor]]:
    """``chunks`` that call ``on_tiles(len(chunk))`` as each chunk is handed on."""

    def reported() -> Iterator[torch.Tensor]:
        for chunk in chunks():
            on_tiles(int(chunk.shape[0]))
            yield chunk

    return reported


RunPiece = Callable[
    [PieceSample, Callable[[], Iterator[torch.Tensor]], torch.Tensor, tuple[int, int]],
    tuple[dict[str, Any], int],
]
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
    on_tiles: Callable[[int], Any] | None = None,
) -> Generator[Progress, None, SlideResult]:
    """What every model's slide inference shares: opening the slide, finding its tissue
    pieces, reading each piece's tiles, progress, and assembling the ``SlideResult``.

    Args:
        run: the model ready to run (its ``config`` has ``classes``, ``kind``,
            ``input_px`` and ``to_dict``).
        slide: an opened slide or its path (a path is opened here and closed at the end).
        tile_um: the model's tile edge in micrometres.
        run_piece: (sample, chunks, cells, shape) as ``tile_chunks`` gives them -> the
            ``PieceResult`` fields the model decides (probabilities, and maps, scores,
            arrays, info as it has them) and the piece's class index.
        finish: the pieces' results -> the slide's probabilities, class index,
            aggregation name and extra ``info`` entries.
        chunk_tiles, tissue, min_tissue, mpp, pieces, on_tiles: as ``predict_slide``
            takes them.

    Yields:
        Progress events, as ``predict_slide``'s.

    Returns:
        The slide's ``SlideResult``.

    Raises:
        ValueError: no piece of the slide has a tissue tile.
    """
    config = run.model.config
    timings = {"tissue": 0.0, "read_and_model": 0.0}
    own = not isinstance(slide, Slide)
    if own:
        slide = open_slide(slide, mpp=mpp)
    try:
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
            chunks, cells, shape = tile_chunks(slide, sample, level, chunk_tiles=chunk_tiles)
            if on_tiles is not None:
                chunks = _reporting(chunks, on_tiles)
            fields, call = run_piece(sample, chunks, cells, shape)
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
            done_tiles += sample.n_tiles
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
        info: dict[str, Any] = {
            "device": str(run.device),
            "amp": bool(run.amp),
            "tiles": int(n_tiles),
            "tile_px": int(tile_px),
            "tiles_per_second": n_tiles / max(timings["read_and_model"], 1e-9),
            **extra_info,
        }
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
            slide_info={
                "mpp": list(slide.mpp) if slide.mpp else None,
                "dimensions": list(slide.dimensions),
                "vendor": slide.vendor,
                "read_level": int(level),
            },
            info=info,
        )
    finally:
        if own:
            slide.close()


def load_any(path: str | os.PathLike, device: str | torch.device | None = "auto"):
    """The model in a checkpoint of any kind, on ``device``, with its checkpoint."""
    from .models.checkpoint import load_model

    return load_model(path, resolve_device(device))


def predict(
    model: torch.nn.Module | str | os.PathLike,
    slide: Slide | str | os.PathLike,
    **options: Any,
) -> Generator[Progress, None, SlideResult]:
    """``predict_slide`` for any model kind: grid attention, dual attention or the sliding
    window.

    Args:
        model: a model, or a checkpoint path (its kind decides).
        slide: an opened slide or its path.
        **options: passed on (device, chunk_tiles, tissue, min_tissue, amp, mpp; the grid
            model also takes aggregation).
    """
    from .models.grid_attention import GridAttention

    if not isinstance(model, torch.nn.Module):
        model, checkpoint = load_any(model, options.get("device", "auto"))
        options.setdefault("checkpoint", str(checkpoint.path))
    checkpoint = options.pop("checkpoint", None)
    from .models.dual_attention import DualAttention

    if isinstance(model, GridAttention):
        result = yield from predict_slide(model, slide, **options)
    elif isinstance(model, DualAttention):
        from .train.dual import predict_slide_dual

        for name in ("aggregation", "chunk_tiles", "min_tissue", "pieces"):
            options.pop(name, None)
        result = yield from predict_slide_dual(model, slide, **options)
    else:
        from .train.sliding_window import predict_slide_sliding_window

        if options.get("aggregation") not in (None, "thresholds", "top-k-mean"):
            options.pop("aggregation")  # a grid-attention rule: not the baseline's
        result = yield from predict_slide_sliding_window(model, slide, **options)
    if checkpoint:
        result.model["checkpoint"] = checkpoint
    return result
