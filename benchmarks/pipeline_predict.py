"""End-to-end ``predict`` against the model alone on the same tiles in memory.

The claim under test: ``inference.predict`` reads a slide through ``TileStream`` (stored
tiles decoded on a thread pool, ahead of the model) while the model works, so the whole
pipeline runs at about the model's own speed. ``benchmarks/pipeline.py`` calls
``predict_ratio`` after its reading figures, on the same slide; run alone, this file does
the same for one slide.

Method. A freshly initialised ``GridAttention`` (the weights do not change the speed)
with the paper's geometry by default: 246 µm tiles (492 level-0 px at 0.5 µm/px, read at
level 0 off the stored-tile lattice) resized to ``--input-px`` (default 224, the paper's).
For each core count (the process is pinned to that many cores with
``os.sched_setaffinity``, so torch's threads and TileStream's decoding threads share
them, as on a machine of that size; torch gets as many threads), each round runs, in
turn:

1. ``predict``: the whole thing, end to end (open the slide, find the tissue, cut the
   pieces, read and run every piece, aggregate), driven by ``jobs.run_to_end``;
2. the model alone: the same pieces' tiles, read once before the rounds and kept in RAM
   as uint8 arrays, through the same model calls (``embed_chunks``, ``attend_features``),
   same batches, same device and autocast.

Throughput is tiles per second of wall time; the best of ``--repeat`` interleaved rounds
is kept, after one untimed pass of each (kernels are built for each new batch shape on
first use). Target: predict / model alone >= 0.9 at every core count. Printed for
information: the same ratio without tissue detection (predict's ``read_and_model`` time).

Usage (from the repository root)::

    .venv/bin/python benchmarks/pipeline_predict.py --slide data/bench/pipeline-16384x12288-s0.tif
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from napari_slide_attention.inference import predict
from napari_slide_attention.jobs import run_to_end
from napari_slide_attention.models.device import Autocast, default_amp, resolve_device
from napari_slide_attention.models.grid_attention import GridAttention, GridAttentionConfig
from napari_slide_attention.slide.reader import open_slide
from napari_slide_attention.slide.sampling import (
    piece_tiles,
    read_level_for,
    slide_pieces,
    tile_edge_px,
)
from napari_slide_attention.slide.tissue import tissue_mask

TARGET = 0.9


@contextlib.contextmanager
def cores(n: int):
    """The process pinned to ``n`` of its cores and torch to ``n`` threads, then back."""
    before = os.sched_getaffinity(0)
    threads = torch.get_num_threads()
    os.sched_setaffinity(0, sorted(before)[:n])
    torch.set_num_threads(n)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
        torch.set_num_threads(threads)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def in_memory(path: Path, model: GridAttention, chunk_tiles: int) -> list:
    """Every tissue piece's tiles as ``predict`` reads them, decoded into RAM."""
    config = model.config
    with open_slide(path) as slide:
        tile_px = tile_edge_px(slide, config.tile_um)
        level = read_level_for(slide, tile_px, config.input_px)
        pieces = slide_pieces(slide, tile_px, mask=tissue_mask(slide))
        out = []
        for sample in pieces:
            tiles = piece_tiles(slide, sample, level, chunk_tiles=chunk_tiles)
            out.append(([b.copy() for b in tiles], tiles.cells, tiles.shape))
    return out


def run_model(model: GridAttention, pieces: list, device: torch.device, amp: bool) -> dict:
    """The model alone on tiles in memory: the calls ``inference/grid.py`` makes."""
    autocast = Autocast(device, amp)
    _sync(device)
    start = time.perf_counter()
    n = 0
    with torch.no_grad():
        for batches, cells, shape in pieces:
            parts = []
            for batch in batches:
                parts.extend(model.embed_chunks([torch.from_numpy(batch)], device, autocast))
            out = model.attend_features(torch.cat(parts), torch.from_numpy(cells), shape)
            torch.softmax(out.logits.float(), 0).cpu()
            out.maps.float().cpu()
            n += len(cells)
    _sync(device)
    return {"seconds": time.perf_counter() - start, "tiles": n}


def run_predict(
    model: GridAttention, path: Path, device: torch.device, amp: bool, chunk_tiles: int
) -> dict:
    _sync(device)
    start = time.perf_counter()
    result = run_to_end(predict(model, path, device=device, amp=amp, chunk_tiles=chunk_tiles))
    _sync(device)
    return {
        "seconds": time.perf_counter() - start,
        "tiles": int(result.info["tiles"]),
        "read_and_model_seconds": float(result.timings["read_and_model"]),
    }


def predict_ratio(
    path: Path,
    *,
    core_counts: list[int],
    repeat: int = 3,
    tile_um: float = 246.0,
    input_px: int = 224,
    chunk_tiles: int = 64,
    device: str = "auto",
    amp: bool | None = None,
) -> dict:
    """Best-of-``repeat`` predict and model-alone throughput per core count, and ratios."""
    device = resolve_device(device)
    amp = default_amp(device) if amp is None else amp
    torch.manual_seed(0)
    config = GridAttentionConfig(classes=("a", "b"), tile_um=tile_um, input_px=input_px)
    model = GridAttention(config).to(device).eval()
    pieces = in_memory(path, model, chunk_tiles)
    n_tiles = sum(len(cells) for _, cells, _ in pieces)
    print(
        f"predict vs model alone: {n_tiles} tissue tiles of {tile_um:g} µm -> {input_px} px, "
        f"device {device}, amp {amp}, chunks of {chunk_tiles}"
    )
    report: dict = {"tiles": n_tiles, "device": str(device), "amp": amp, "cores": {}}
    ok = True
    available = len(os.sched_getaffinity(0))
    for n in core_counts:
        if n > available:
            print(f"  {n} cores: skipped ({available} available)")
            continue
        runs: dict[str, list[dict]] = {"predict": [], "model alone": []}
        with cores(n):
            # warm-up: oneDNN (and cuDNN) build kernels for each new batch shape the first
            # time they see it; one untimed pass of each takes that out of the rounds
            run_predict(model, path, device, amp, chunk_tiles)
            run_model(model, pieces, device, amp)
            for r in range(repeat):
                order = ["predict", "model alone"] if r % 2 == 0 else ["model alone", "predict"]
                for name in order:
                    if name == "predict":
                        runs[name].append(run_predict(model, path, device, amp, chunk_tiles))
                    else:
                        runs[name].append(run_model(model, pieces, device, amp))
        rate = {k: max(x["tiles"] / x["seconds"] for x in v) for k, v in runs.items()}
        inner = max(x["tiles"] / x["read_and_model_seconds"] for x in runs["predict"])
        ratio = rate["predict"] / rate["model alone"]
        passed = ratio >= TARGET
        ok &= passed
        print(
            f"  {n} core(s): predict {rate['predict']:7.1f} tiles/s, model alone "
            f"{rate['model alone']:7.1f} tiles/s -> predict / model alone {ratio:5.2f} "
            f"(target >= {TARGET}) {'PASS' if passed else 'FAIL'}; without tissue "
            f"detection {inner / rate['model alone']:5.2f}"
        )
        report["cores"][n] = {
            "predict_tiles_per_s": rate["predict"],
            "model_alone_tiles_per_s": rate["model alone"],
            "ratio": ratio,
            "ratio_without_tissue": inner / rate["model alone"],
            "pass": passed,
            "runs": runs,
        }
    report["pass"] = ok
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slide", type=Path, required=True, help="a pyramidal TIFF slide")
    parser.add_argument("--cores", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tile-um", type=float, default=246.0)
    parser.add_argument("--input-px", type=int, default=224)
    parser.add_argument("--chunk-tiles", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    report = predict_ratio(
        args.slide,
        core_counts=args.cores,
        repeat=args.repeat,
        tile_um=args.tile_um,
        input_px=args.input_px,
        chunk_tiles=args.chunk_tiles,
        device=args.device,
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=float))
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
