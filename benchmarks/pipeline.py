"""Whole-slide inference throughput: ``predict_slide`` against the model alone.

The claim under test: in ``predict_slide`` the slide is read (a background thread reads
each piece's tiles in bands of grid rows, ``tile_chunks``) while the model works on the
previous chunk, so reading hides behind compute and the whole pipeline runs at about the
model's own speed.

Method. A synthetic slide (``write_synthetic_slide``, default 16384 x 12288 px at
0.5 µm/px, JPEG q90 tiles, the seed's number of tissue pieces) is written once under
``--dir`` (``data/bench/``, gitignored). The model is a freshly initialised
``GridAttention`` (the weights do not change the speed; its frozen BN statistics are
calibrated on a few hundred of the slide's tiles so that activations have a realistic
range) with ``--tile-um`` (default 64 µm -> 128 level-0 px tiles) and ``--input-px``
(default 64 -> tiles read at level 1, no resize), passed to ``predict_slide`` as the
module. Each round runs, in turn, on the same tiles, same chunks, same model, same device
and autocast:

1. ``predict_slide``: the whole thing, end to end (open the slide, find the tissue, cut
   the pieces, read and run every piece, aggregate), driven by ``run_to_end``;
2. model alone: ``model.predict_chunks`` on every piece's chunks already decoded into
   RAM (uint8 tensors, pre-read once with ``tile_chunks`` before the rounds);
3. read only (for information): every piece's ``tile_chunks`` iterated with no model,
   which says how much reading would cost if nothing hid it.

Throughput is tiles per second of wall time; the best of ``--repeat`` interleaved rounds
is kept (the median is printed too; the order of the methods turns from round to round).
On a CPU shared with other busy processes the model's speed swings widely (130 to 400
tiles/s from round to round with 2 threads on the project's 2-core machine while other
jobs ran), so take several rounds; ``--threads 1`` was steadier there.

Target: ``predict_slide`` >= 0.9 x the model alone ("reading must hide behind
compute"). Also printed for information: the ratio with predict_slide's own
``read_and_model`` time (tissue detection and opening left out), the read-only speed
against the model's, and the CPU time per tile of each method. Exits 1 when the target
fails.

Usage (from the repository root)::

    .venv/bin/python benchmarks/pipeline.py                       # CPU or CUDA, whichever
    .venv/bin/python benchmarks/pipeline.py --device cpu --no-amp --json data/bench/pipe.json
    .venv/bin/python benchmarks/pipeline.py --device cuda --input-px 224 --tile-um 112
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from napari_slide_attention.inference import default_amp, predict_slide, resolve_device
from napari_slide_attention.models.grid_attention import GridAttention, GridAttentionConfig
from napari_slide_attention.progress import run_to_end
from napari_slide_attention.slide.reader import open_slide
from napari_slide_attention.slide.synthetic import SYNTHETIC_CLASSES, write_synthetic_slide
from napari_slide_attention.slide.tissue import tissue_mask
from napari_slide_attention.train.data import (
    read_level_for,
    slide_pieces,
    tile_chunks,
    tile_edge_px,
)

TARGET = 0.9
CALIBRATION_TILES = 512


def make_slide(directory: Path, width: int, height: int, seed: int, n_pieces: int | None):
    """The benchmark slide (written once, then reused)."""
    pieces = "" if n_pieces is None else f"-p{n_pieces}"
    path = directory / f"pipeline-{width}x{height}-s{seed}{pieces}.tif"
    if not path.exists() or not Path(f"{path}.json").exists():
        start = time.perf_counter()
        write_synthetic_slide(
            path, (width, height), "carcinoma", seed, n_pieces=n_pieces, quality=90
        )
        print(
            f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB) "
            f"in {time.perf_counter() - start:.0f} s",
            flush=True,
        )
    return path


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_pipeline(model, path: Path, device, chunk_tiles: int, amp: bool) -> dict:
    _sync(device)
    cpu, start = time.process_time(), time.perf_counter()
    result = run_to_end(predict_slide(model, path, device=device, chunk_tiles=chunk_tiles, amp=amp))
    _sync(device)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "seconds": seconds,
        "cpu": cpu,
        "tiles": int(result.info["tiles"]),
        "tissue_seconds": float(result.timings["tissue"]),
        "read_and_model_seconds": float(result.timings["read_and_model"]),
    }


def run_model(model, decoded: list, device, amp: bool) -> dict:
    _sync(device)
    cpu, start = time.process_time(), time.perf_counter()
    tiles = 0
    for chunks, cells, shape in decoded:
        out = model.predict_chunks(chunks, cells, shape, device=device, amp=amp)
        torch.softmax(out.logits.float(), 0).cpu()
        out.maps.float().cpu()
        tiles += len(cells)
    _sync(device)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"seconds": seconds, "cpu": cpu, "tiles": tiles}


def run_read(path: Path, pieces, level: int, chunk_tiles: int) -> dict:
    cpu, start = time.process_time(), time.perf_counter()
    tiles = 0
    with open_slide(path) as slide:
        for sample in pieces:
            chunks, _, _ = tile_chunks(slide, sample, level, chunk_tiles=chunk_tiles)
            for chunk in chunks():
                tiles += chunk.shape[0]
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"seconds": seconds, "cpu": cpu, "tiles": tiles}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("data/bench"), help="slide cache")
    parser.add_argument("--width", type=int, default=16384, help="slide width, px")
    parser.add_argument("--height", type=int, default=12288, help="slide height, px")
    parser.add_argument("--seed", type=int, default=0, help="synthetic slide seed")
    parser.add_argument("--n-pieces", type=int, default=None, help="tissue pieces (seed's)")
    parser.add_argument("--tile-um", type=float, default=64.0, help="tile edge, µm")
    parser.add_argument("--input-px", type=int, default=64, help="model input, px")
    parser.add_argument("--chunk-tiles", type=int, default=64, help="tiles per chunk")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="autocast (default: predict_slide's, i.e. on CUDA and on CPUs with native bf16)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--repeat", type=int, default=5, help="rounds; best is kept")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    amp = default_amp(device) if args.amp is None else bool(args.amp)
    path = make_slide(args.dir, args.width, args.height, args.seed, args.n_pieces)
    torch.manual_seed(0)
    config = GridAttentionConfig(
        classes=SYNTHETIC_CLASSES, tile_um=args.tile_um, input_px=args.input_px
    )
    model = GridAttention(config)

    # the pieces and their tiles, decoded once into RAM for the model-alone runs
    start = time.perf_counter()
    with open_slide(path) as slide:
        tile_px = tile_edge_px(slide, config.tile_um)
        level = read_level_for(slide, tile_px, config.input_px)
        pieces = slide_pieces(slide, tile_px, mask=tissue_mask(slide))
        decoded = []
        for sample in pieces:
            chunks, cells, shape = tile_chunks(slide, sample, level, chunk_tiles=args.chunk_tiles)
            decoded.append((list(chunks()), cells, shape))
        read_side = slide.level_info[level].shape
    n_tiles = sum(len(cells) for _, cells, _ in decoded)
    tile_bytes = sum(c.numel() for chunks, _, _ in decoded for c in chunks)
    calibration = [c for chunks, _, _ in decoded for c in chunks]
    calibration = torch.cat(calibration)[:: max(1, n_tiles // CALIBRATION_TILES)]
    model.calibrate_frozen_batchnorm(calibration.split(args.chunk_tiles))
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    tile_read_px = decoded[0][0][0].shape[1] if decoded else 0
    print(
        f"slide {path} ({path.stat().st_size / 1e6:.0f} MB), {args.width} x {args.height} px; "
        f"{len(pieces)} piece(s), {n_tiles} tiles of {tile_px} level-0 px "
        f"({args.tile_um:g} µm), read at level {level} ({read_side[1]} x {read_side[0]} px) "
        f"as {tile_read_px} px -> input {config.input_px} px; chunks of {args.chunk_tiles}; "
        f"pre-decoded {tile_bytes / 1e6:.0f} MB in {time.perf_counter() - start:.1f} s"
    )
    print(
        f"device {device} ({name}), autocast {'on' if amp else 'off'}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
        f"{os.cpu_count()} cores, python {platform.python_version()}",
        flush=True,
    )
    # warm-up: kernel selection and allocator growth on a piece's first chunks
    if decoded:
        chunks, cells, shape = decoded[0]
        warm = min(len(chunks), 2)
        n = sum(c.shape[0] for c in chunks[:warm])
        rows = int(cells[n - 1]) // shape[1] + 1  # cells are row-major
        model.predict_chunks(chunks[:warm], cells[:n], (rows, shape[1]), device=device, amp=amp)

    methods = {
        "predict_slide": lambda: run_pipeline(model, path, device, args.chunk_tiles, amp),
        "model alone": lambda: run_model(model, decoded, device, amp),
        "read only": lambda: run_read(path, pieces, level, args.chunk_tiles),
    }
    runs: dict[str, list[dict]] = {name: [] for name in methods}
    order = list(methods)
    for round_ in range(1, args.repeat + 1):
        # every method once per round, the order turning each round, so that load from
        # other processes and any order effect fall on all of them alike
        shift = (round_ - 1) % len(order)
        for method in order[shift:] + order[:shift]:
            result = methods[method]()
            if result["tiles"] != n_tiles:
                raise RuntimeError(f"{method} ran {result['tiles']} tiles, expected {n_tiles}")
            result["tiles_per_s"] = result["tiles"] / result["seconds"]
            runs[method].append(result)
            extra = ""
            if "tissue_seconds" in result:
                extra = (
                    f", tissue {result['tissue_seconds']:.2f} s, "
                    f"read+model {result['read_and_model_seconds']:.2f} s"
                )
            print(
                f"  round {round_}: {method:<14}{result['tiles_per_s']:9.1f} tiles/s "
                f"({result['seconds']:.2f} s, {result['cpu']:.2f} CPU s{extra})",
                flush=True,
            )

    results: dict[str, dict] = {}
    for method, done in runs.items():
        best = dict(max(done, key=lambda r: r["tiles_per_s"]))
        best["median_tiles_per_s"] = float(np.median([r["tiles_per_s"] for r in done]))
        best["cpu_ms_per_tile"] = min(r["cpu"] / r["tiles"] for r in done) * 1e3
        best["rounds"] = [round(r["tiles_per_s"], 1) for r in done]
        results[method] = best

    print()
    print(f"{'method':<15}{'best tiles/s':>13}{'median':>9}{'seconds':>9}{'CPU ms/tile':>13}")
    for method, r in results.items():
        print(
            f"{method:<15}{r['tiles_per_s']:>13.1f}{r['median_tiles_per_s']:>9.1f}"
            f"{r['seconds']:>9.2f}{r['cpu_ms_per_tile']:>13.2f}"
        )
    print()
    pipe, alone = results["predict_slide"], results["model alone"]
    ratio = pipe["tiles_per_s"] / alone["tiles_per_s"]
    ok = ratio >= TARGET
    checks = [
        {"ratio": "predict_slide / model alone", "value": ratio, "target": TARGET, "pass": ok}
    ]
    print(
        f"predict_slide / model alone  {ratio:5.2f}  (target >= {TARGET:.2f})  "
        f"{'PASS' if ok else 'FAIL'}"
    )
    best_rm = min(r["read_and_model_seconds"] for r in runs["predict_slide"])
    inner = (n_tiles / best_rm) / alone["tiles_per_s"]
    tissue_s = min(r["tissue_seconds"] for r in runs["predict_slide"])
    print(
        f"read+model only / model alone {inner:5.2f}  (information: predict_slide without "
        f"opening and tissue detection, which took {tissue_s:.2f} s at best)"
    )
    read = results["read only"]
    print(
        f"read only / model alone       {read['tiles_per_s'] / alone['tiles_per_s']:5.2f}  "
        "(information: how much faster reading is than the model)"
    )

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "slide": str(path),
            "size": [args.width, args.height],
            "pieces": len(pieces),
            "tiles": n_tiles,
            "tile_px": tile_px,
            "read_level": level,
            "settings": {
                "tile_um": args.tile_um,
                "input_px": args.input_px,
                "chunk_tiles": args.chunk_tiles,
                "device": str(device),
                "device_name": name,
                "amp": amp,
                "torch_threads": torch.get_num_threads(),
                "repeat": args.repeat,
            },
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "results": results,
            "checks": checks,
        }
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
