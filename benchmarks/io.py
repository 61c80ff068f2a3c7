"""Tile-reading throughput: TileStream against a plain decode and peer readers.

Generates (once, cached) a JPEG-tiled pyramidal RGB TIFF with textured, H&E-like
content, then reads every level-0 tile with:

1. ``TileStream`` (the package's reader for models);
2. the limit: a plain ``imagecodecs.jpeg8_decode`` of the same stored tile bytes,
   pre-read into memory, on a thread pool of the same size, each thread decoding into
   one cache-resident tile buffer (nothing is delivered anywhere);
3. the dask/zarr path: ``slide.levels[0]`` computed in bands of tile rows;
4. tiffslide ``read_region`` per tile, and
5. openslide-python ``read_region`` per tile, each on a pool of per-thread handles;
6. on request (``--only ... "TileStream aligned"``), TileStream with its batch rows on
   32-byte boundaries, which libjpeg-turbo writes with non-temporal stores.

Prints megapixels per second (best of ``--repeat`` interleaved rounds, and the median)
and CPU time per tile, and the ratios of the best rounds TileStream / plain decode
(target >= 0.85) and TileStream / tiffslide and / openslide (target >= 1.3). Exits 1
when a target is missed.

Usage (from the repository root)::

    PYTHONPATH=src python benchmarks/io.py                  # 32768 x 32768, ~0.5 GB file
    PYTHONPATH=src python benchmarks/io.py --size 8192      # a quick run
    PYTHONPATH=src python benchmarks/io.py --json out/io.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile

from decode_limit import plain_decode
from napari_slide_attention.slide.reader import open_slide
from napari_slide_attention.slide.stream import TileStream, default_workers

TILE = 256
QUALITY = 90
TARGET_VS_DECODE = 0.85
TARGET_VS_PEER = 1.3


# -- the test slide -----------------------------------------------------------------------


def _texture_bank(count: int = 24, seed: int = 7) -> np.ndarray:
    """Tiles of cell-like texture in [0, 1]: blurred noise plus dark round nuclei."""
    from skimage.filters import gaussian

    rng = np.random.default_rng(seed)
    bank = np.empty((count, TILE, TILE), dtype=np.float32)
    yy, xx = np.mgrid[0:TILE, 0:TILE]
    for k in range(count):
        fine = gaussian(rng.normal(size=(TILE, TILE)), sigma=1.2)
        coarse = gaussian(rng.normal(size=(TILE, TILE)), sigma=6.0)
        texture = 0.5 + 1.5 * fine + 4.0 * coarse
        nuclei = np.zeros((TILE, TILE), dtype=np.float32)
        for _ in range(rng.integers(20, 60)):
            cy, cx = rng.integers(0, TILE, size=2)
            r = rng.uniform(3, 8)
            nuclei[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 1.0
        nuclei = gaussian(nuclei, sigma=1.0)
        bank[k] = np.clip(0.35 * texture + 0.9 * nuclei, 0, 1)
    return bank


def _tiles(size: int, downsample: int, bank: np.ndarray) -> Iterator[np.ndarray]:
    """Yield the tiles of one level in row-major order (tifffile's tile order)."""
    rng = np.random.default_rng(downsample)
    n = math.ceil(size / downsample / TILE)
    background = np.array([238, 236, 240], dtype=np.float32)
    eosin = np.array([232, 150, 190], dtype=np.float32)
    hematoxylin = np.array([110, 70, 160], dtype=np.float32)
    ramp = np.arange(TILE, dtype=np.float32)
    for r in range(n):
        y = (r * TILE + ramp) * downsample
        for c in range(n):
            x = (c * TILE + ramp) * downsample
            # Separable low-frequency fields in level-0 coordinates, so every level shows
            # the same "tissue": where it is (mask) and which stain dominates (mix).
            field = np.outer(np.cos(y / 2900.0), np.sin(x / 3700.0)) + 0.6 * np.outer(
                np.sin(y / 1300.0 + 1.0), np.cos(x / 1100.0)
            )
            mask = np.clip((field + 0.3) * 2.5, 0, 1)[..., None]
            mix = np.clip(0.5 + 0.4 * np.outer(np.sin(y / 700.0), np.sin(x / 900.0)), 0, 1)
            texture = bank[(r * 7 + c * 13 + downsample) % len(bank)][..., None]
            stain = eosin + (hematoxylin - eosin) * (mix[..., None] * 0.6 + texture * 0.7)
            tissue = stain * (1.0 - 0.25 * texture)
            pixels = background + (tissue - background) * mask
            pixels += rng.normal(0, 3.0, size=(TILE, 1, 1)).astype(np.float32)
            yield np.clip(pixels, 0, 255).astype(np.uint8)


def make_slide(path: Path, size: int) -> Path:
    """Write a size x size JPEG-tiled pyramidal TIFF tile by tile (small memory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    bank = _texture_bank()
    downsamples = [1]
    while size // (downsamples[-1] * 2) >= 1024:
        downsamples.append(downsamples[-1] * 2)
    options = {
        "tile": (TILE, TILE),
        "compression": "jpeg",
        "compressionargs": {"level": QUALITY},
        "photometric": "rgb",
        "dtype": np.uint8,
        "maxworkers": default_workers(),
    }
    start = time.perf_counter()
    with tifffile.TiffWriter(partial, bigtiff=True) as tif:
        for i, downsample in enumerate(downsamples):
            side = math.ceil(size / downsample)
            extra = {"subifds": len(downsamples) - 1} if i == 0 else {"subfiletype": 1}
            tif.write(
                _tiles(size, downsample, bank),
                shape=(side, side, 3),
                description=json.dumps({"mpp": 0.25 * downsample}) if i == 0 else None,
                **options,
                **extra,
            )
    partial.replace(path)
    print(
        f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB, {len(downsamples)} levels) "
        f"in {time.perf_counter() - start:.0f} s"
    )
    return path


# -- methods ------------------------------------------------------------------------------


def _level0_boxes(size: int) -> np.ndarray:
    n = math.ceil(size / TILE)
    ys, xs = np.mgrid[0:n, 0:n]
    return np.stack(
        [xs.ravel() * TILE, ys.ravel() * TILE, np.full(n * n, TILE), np.full(n * n, TILE)],
        axis=1,
    ).astype(np.int64)


def run_tilestream(path: Path, size: int, workers: int) -> dict:
    slide = open_slide(path)
    boxes = _level0_boxes(size)
    stream = TileStream(slide, 0, boxes, batch_size=STREAM_SETTINGS["batch_size"], workers=workers)
    cpu, start = time.process_time(), time.perf_counter()
    tiles = 0
    for batch in stream:
        tiles += len(batch)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    slide.close()
    return {"seconds": seconds, "cpu": cpu, "tiles": tiles, "direct_tiles": stream.stats.direct}


def run_tilestream_aligned(path: Path, size: int, workers: int) -> dict:
    """TileStream with its batch rows on 32-byte boundaries (what it avoids; opt-in).

    libjpeg-turbo's SIMD colour conversion stores such rows with non-temporal stores;
    TileStream offsets its batch arrays so that it does not (``JPEG_ROW_OFFSET``).
    """
    from napari_slide_attention.slide import stored_tiles

    saved, stored_tiles.JPEG_ROW_OFFSET = stored_tiles.JPEG_ROW_OFFSET, 0
    try:
        return run_tilestream(path, size, workers)
    finally:
        stored_tiles.JPEG_ROW_OFFSET = saved


def run_plain_decode(path: Path, size: int, workers: int) -> dict:
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        colorspace, outcolorspace = tifffile.tifffile.jpeg_decode_colorspace(
            page.photometric, page.planarconfig, page.extrasamples, page.is_jfif
        )
        tables = page.jpegtables
        fh = tif.filehandle
        blobs = []
        for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True):
            fh.seek(offset)
            blobs.append(fh.read(count))

    return plain_decode(
        blobs, TILE, workers, tables=tables, colorspace=colorspace, outcolorspace=outcolorspace
    )


def run_dask(path: Path, size: int, workers: int) -> dict:
    slide = open_slide(path)
    level = slide.levels[0]
    band = 4 * TILE  # 4 tile rows per compute: ~100 MB at 32768 px wide
    cpu, start = time.process_time(), time.perf_counter()
    for y in range(0, level.shape[0], band):
        level[y : y + band].compute(scheduler="threads", num_workers=workers)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    slide.close()
    return {"seconds": seconds, "cpu": cpu, "tiles": math.ceil(size / TILE) ** 2}


def _per_thread(make: Callable[[], object], read: Callable[[object, int, int], None]):
    local = threading.local()
    handles = []

    def work(chunk: np.ndarray) -> int:
        handle = getattr(local, "handle", None)
        if handle is None:
            handle = local.handle = make()
            handles.append(handle)
        for x, y, _, _ in chunk:
            read(handle, int(x), int(y))
        return len(chunk)

    return work, handles


def _run_peer(size: int, workers: int, make, read) -> dict:
    boxes = _level0_boxes(size)
    work, handles = _per_thread(make, read)
    # Chunks of 32 tiles, like TileStream's batches.
    chunks = [boxes[i : i + 32] for i in range(0, len(boxes), 32)]
    with ThreadPoolExecutor(workers) as pool:
        cpu, start = time.process_time(), time.perf_counter()
        tiles = sum(pool.map(work, chunks))
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    for handle in handles:
        handle.close()
    return {"seconds": seconds, "cpu": cpu, "tiles": tiles}


def run_tiffslide(path: Path, size: int, workers: int) -> dict:
    import tiffslide

    def read(slide, x: int, y: int) -> None:
        slide.read_region((x, y), 0, (TILE, TILE), as_array=True)

    return _run_peer(size, workers, lambda: tiffslide.TiffSlide(path), read)


def run_openslide(path: Path, size: int, workers: int) -> dict:
    import openslide

    def read(slide, x: int, y: int) -> None:
        # RGBA PIL image -> array: what a caller of openslide has to do anyway.
        np.asarray(slide.read_region((x, y), 0, (TILE, TILE)))

    return _run_peer(size, workers, lambda: openslide.OpenSlide(str(path)), read)


# TileStream batch size (--batch-size): batches of 32 tiles (6 MB) fall out of the cache
# between decode and use on small machines; docs/benchmarks.md gives both figures.
STREAM_SETTINGS = {"batch_size": 32}

METHODS = {
    "TileStream": run_tilestream,
    "plain decode": run_plain_decode,
    "dask/zarr": run_dask,
    "tiffslide": run_tiffslide,
    "openslide": run_openslide,
    "TileStream aligned": run_tilestream_aligned,
}
# Run unless --only names others; "TileStream aligned" only on request.
DEFAULT_METHODS = ["TileStream", "plain decode", "dask/zarr", "tiffslide", "openslide"]
PEER_MODULES = {"tiffslide": "tiffslide", "openslide": "openslide"}


def _warm_cache(path: Path) -> None:
    """Read the file once so that every method reads from the page cache."""
    with open(path, "rb") as fh:
        while fh.read(64 << 20):
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("data/bench"), help="slide cache")
    parser.add_argument("--size", type=int, default=32768, help="slide side in pixels")
    parser.add_argument("--workers", type=int, default=None, help="threads (default: cores)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; best is kept")
    parser.add_argument("--batch-size", type=int, default=32, help="TileStream batch size")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument(
        "--only", nargs="*", choices=list(METHODS), default=None, help="methods to run"
    )
    args = parser.parse_args(argv)
    STREAM_SETTINGS["batch_size"] = args.batch_size
    workers = args.workers or default_workers()
    path = args.dir / f"bench-{args.size}-jpeg{QUALITY}-t{TILE}.tif"
    if not path.exists():
        make_slide(path, args.size)
    warnings.simplefilter("ignore")
    _warm_cache(path)
    megapixels = math.ceil(args.size / TILE) ** 2 * TILE * TILE / 1e6
    print(
        f"slide {path} ({path.stat().st_size / 1e6:.0f} MB), level 0: {args.size} x {args.size}, "
        f"{math.ceil(args.size / TILE) ** 2} tiles of {TILE} px, JPEG q{QUALITY}; "
        f"{workers} threads, TileStream batch {args.batch_size}; "
        f"python {platform.python_version()}, "
        f"imagecodecs {imagecodecs.__version__}, tifffile {tifffile.__version__}"
    )

    names = []
    for name in args.only or DEFAULT_METHODS:
        module = PEER_MODULES.get(name)
        if module is not None:
            try:
                __import__(module)
            except ImportError as exc:
                print(f"  {name}: skipped ({module} is not importable: {exc})")
                continue
        names.append(name)

    # Rounds run every method once, in turn, so that load from other processes on a
    # shared machine hits all of them alike; each method's best round is kept.
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_ in range(1, args.repeat + 1):
        for name in names:
            run = METHODS[name](path, args.size, workers)
            run["mp_per_s"] = run["tiles"] * TILE * TILE / 1e6 / run["seconds"]
            runs[name].append(run)
            extra = f", {run['direct_tiles']} decoded directly" if "direct_tiles" in run else ""
            print(
                f"  round {round_}: {name:<18} {run['mp_per_s']:8.1f} MP/s "
                f"({run['seconds']:.2f} s, {run['cpu']:.2f} CPU s{extra})",
                flush=True,
            )
    results: dict[str, dict] = {}
    for name, done in runs.items():
        best = dict(max(done, key=lambda r: r["mp_per_s"]))
        best["median_mp_per_s"] = float(np.median([r["mp_per_s"] for r in done]))
        best["cpu_us_per_tile"] = min(r["cpu"] / r["tiles"] for r in done) * 1e6
        best["rounds"] = [round(r["mp_per_s"], 1) for r in done]
        results[name] = best

    print()
    print(f"{'method':<19}{'best MP/s':>11}{'median':>9}{'tiles/s':>9}{'CPU us/tile':>13}")
    for name, run in results.items():
        print(
            f"{name:<19}{run['mp_per_s']:>11.1f}{run['median_mp_per_s']:>9.1f}"
            f"{run['tiles'] / run['seconds']:>9.0f}{run['cpu_us_per_tile']:>13.0f}"
        )
    print()
    checks = []
    if "TileStream" in results:
        ours = results["TileStream"]["mp_per_s"]
        for peer, target in (
            ("plain decode", TARGET_VS_DECODE),
            ("tiffslide", TARGET_VS_PEER),
            ("openslide", TARGET_VS_PEER),
        ):
            if peer not in results:
                continue
            ratio = ours / results[peer]["mp_per_s"]
            ok = ratio >= target
            checks.append(
                {"ratio": f"TileStream / {peer}", "value": ratio, "target": target, "pass": ok}
            )
            verdict = "PASS" if ok else "FAIL"
            print(f"TileStream / {peer:<13} {ratio:5.2f}  (target >= {target:.2f})  {verdict}")
        if "dask/zarr" in results:
            ratio = ours / results["dask/zarr"]["mp_per_s"]
            print(f"TileStream / {'dask/zarr':<13} {ratio:5.2f}  (for information)")

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "slide": str(path),
            "size": args.size,
            "tile": TILE,
            "quality": QUALITY,
            "megapixels": megapixels,
            "workers": workers,
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "versions": {"imagecodecs": imagecodecs.__version__, "tifffile": tifffile.__version__},
            "results": results,
            "checks": checks,
        }
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0 if all(c["pass"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
