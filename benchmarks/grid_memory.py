"""Peak memory of one grid-attention training step against the size of the tissue region.

The claim under test (PAPERS.md §1, "our decisions"): with only the last residual stage
training, ``GridAttention.train_step`` (pass 1 without autograd, then the trainable stage
again per chunk with autograd) needs memory that grows with H'·W'·512 floats, not with
pixels, so a 40,000² px region trains in about the memory of a 4,000² px one.

Method. Each region is a square of ``size`` level-0 px cut into a grid of ``--tile`` px
tiles (H' = W' = floor(size / tile); every cell is tissue: 4k² -> 15², 10k² -> 39²,
20k² -> 78², 40k² -> 156² = 24,336 tiles at the default 256 px). Every size runs in a
FRESH subprocess, which:

1. imports torch and the package, builds ``GridAttention(GridAttentionConfig(4 classes,
   n_maps=64, trainable_blocks=1, input_px=--input-px))`` in train mode and an Adam
   optimiser on its trainable parameters, and records the baseline (peak RSS so far);
2. runs ONE training step: ``optimizer.zero_grad()``, ``model.train_step(...)`` (both
   passes and the backward) with ``cache_bytes=0`` (no pass-1 cache: the cache trades
   memory for speed, so it would make the peak depend on its budget), then
   ``optimizer.step()`` (Adam creates its state, 2 floats per trainable parameter, in
   this step; ``--optimizer none`` leaves the optimiser out);
3. reports ``resource.getrusage(RUSAGE_SELF).ru_maxrss``: the child's whole peak RSS,
   minus nothing (imports, weights, allocator and the step), and the step's increment
   over the baseline. With ``--device cuda`` the peak is
   ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()`` (the
   baseline then is ``memory_allocated()`` after the model and optimiser are on the GPU).

Tiles are not read from a slide: each chunk is generated procedurally and
deterministically (a ``torch.Generator`` seeded with the chunk's index gives uint8
(n, s, s, 3) noise at the model's input size ``--input-px``), so both passes see the same
tiles and the figures measure the model, not a reader. The default input is 64 px (a
CPU-sized run); the paper's 224 px input is ``--input-px 224``, which changes the memory
per chunk in flight (a constant), not the per-tile 512 features that grow with the grid.
Autocast is off on CPU (``train_step``'s default, as in training), on with CUDA.

For contrast, the naive way: ``model(tiles, cells, shape)`` on ALL the tiles at once,
then ``loss.backward()`` (the frozen stages still run without autograd, as in
``forward``; the trainable stage keeps its activations for every tile), with the same
optimiser step. It is measured on the smallest size, and with ``--naive`` on every size
up to 10,000 px; nothing is extrapolated.

Target: the peak of the largest size (40k²) <= 1.5 x the peak of the smallest (4k²),
both the child's total peak RSS on CPU (total allocated peak on CUDA). Exits 1 when the
target fails. The same step's peak RSS varies from process to process (the 4k² step
measured 504-552 MB over eight processes on the project's 2-core machine), which is
about 0.1 of the target ratio; ``--repeat N`` runs every size N times, in rounds, and
compares the medians (it also prints the extremes). Step times are the fastest round's;
on a shared machine they vary far more than the memory does (with other jobs running
there, the 40k² step took 542-577 s with torch's 2 threads and 150-160 s with
``--threads 1``).

Usage (from the repository root)::

    .venv/bin/python benchmarks/grid_memory.py                    # 4k, 10k, 20k, 40k px
    .venv/bin/python benchmarks/grid_memory.py --naive --json data/bench/grid_memory.json
    .venv/bin/python benchmarks/grid_memory.py --device cuda --input-px 224
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_SIZES = (4000, 10000, 20000, 40000)
NAIVE_MAX_SIZE = 10000
TARGET_RATIO = 1.5
CLASSES = ("class-0", "class-1", "class-2", "class-3")
MB = 1 << 20


# -- the child: one measurement in a fresh process ----------------------------------------


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _rss_now_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_child(spec: dict) -> dict:
    """One training step (or one naive forward/backward) on one region; returns figures."""
    start = time.perf_counter()
    import torch
    import torch.nn.functional as F

    from napari_slide_attention.models.grid_attention import GridAttention, GridAttentionConfig

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    config = GridAttentionConfig(
        classes=CLASSES, n_maps=spec["n_maps"], trainable_blocks=1, input_px=spec["input_px"]
    )
    model = GridAttention(config).to(device).train()
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = None
    if spec["optimizer"] == "adam":
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    side = spec["size"] // spec["tile"]
    n_tiles = side * side
    cells = torch.arange(n_tiles)
    s, per = spec["input_px"], spec["chunk_tiles"]

    def chunks():
        for index, first in enumerate(range(0, n_tiles, per)):
            generator = torch.Generator().manual_seed(1000 + index)
            n = min(per, n_tiles - first)
            yield torch.randint(0, 256, (n, s, s, 3), dtype=torch.uint8, generator=generator)

    setup_seconds = time.perf_counter() - start
    baseline_rss = _rss_peak_bytes()
    baseline_rss_now = _rss_now_bytes()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline_cuda = torch.cuda.memory_allocated()
    cpu0, t0 = time.process_time(), time.perf_counter()
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    if spec["mode"] == "step":
        result = model.train_step(chunks, cells, (side, side), 1, device=device, cache_bytes=0)
        loss = result.loss
    else:
        tiles = torch.cat(list(chunks())).to(device)
        out = model(tiles, cells.to(device), (side, side))
        loss_t = F.cross_entropy(out.logits[None], torch.tensor([1], device=device))
        loss_t.backward()
        loss = float(loss_t.detach())
        del tiles, out, loss_t
    if optimizer is not None:
        optimizer.step()
    if cuda:
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    report = {
        **spec,
        "grid": [side, side],
        "tiles": n_tiles,
        "loss": loss,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "setup_seconds": setup_seconds,
        "torch_threads": torch.get_num_threads(),
        "baseline_rss": baseline_rss,
        "baseline_rss_now": baseline_rss_now,
        "peak_rss": _rss_peak_bytes(),
    }
    if cuda:
        report["baseline_cuda"] = baseline_cuda
        report["peak_cuda"] = torch.cuda.max_memory_allocated()
        report["device_name"] = torch.cuda.get_device_name(device)
    return report


def measure(spec: dict) -> dict:
    """Run ``run_child(spec)`` in a fresh interpreter and return its report."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parent.parent / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(
            f"the child for {spec} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["process_seconds"] = wall
    return report


# -- the parent: every size in turn, then the table ----------------------------------------


def _peak(report: dict) -> int:
    return report["peak_cuda"] if "peak_cuda" in report else report["peak_rss"]


def _baseline(report: dict) -> int:
    return report["baseline_cuda"] if "baseline_cuda" in report else report["baseline_rss"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="region sides, px"
    )
    parser.add_argument("--tile", type=int, default=256, help="tile edge, level-0 px")
    parser.add_argument("--input-px", type=int, default=64, help="model input (224: paper)")
    parser.add_argument("--chunk-tiles", type=int, default=64, help="tiles per chunk")
    parser.add_argument("--n-maps", type=int, default=64, help="attention maps (m)")
    parser.add_argument(
        "--optimizer", choices=("adam", "none"), default="adam", help="step with Adam or not"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--naive",
        action="store_true",
        help=f"measure naive on every size <= {NAIVE_MAX_SIZE} px (default: the smallest only)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="fresh processes per size; the median is kept"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)

    if args.child is not None:
        print(json.dumps(run_child(json.loads(args.child))))
        return 0

    sizes = sorted(set(args.sizes))
    if any(size < args.tile for size in sizes):
        parser.error("every size must be at least one tile")
    base = {
        "tile": args.tile,
        "input_px": args.input_px,
        "chunk_tiles": args.chunk_tiles,
        "n_maps": args.n_maps,
        "optimizer": args.optimizer,
        "device": args.device,
        "threads": args.threads,
    }
    naive_sizes = [s for s in sizes if s <= NAIVE_MAX_SIZE] if args.naive else sizes[:1]
    cuda = args.device.startswith("cuda")
    unit = "CUDA allocated" if cuda else "process RSS"
    print(
        f"one training step (train_step, cache_bytes=0"
        f"{', + Adam step' if args.optimizer == 'adam' else ''}) per fresh process; "
        f"tiles {args.tile} px -> input {args.input_px} px, chunks of {args.chunk_tiles}, "
        f"m={args.n_maps}; device {args.device}; peak = {unit}; "
        f"python {platform.python_version()}, {os.cpu_count()} cores",
        flush=True,
    )
    # Rounds run every size in turn (fresh processes); peaks vary a little from process to
    # process (allocator arenas, thread timing), so each size keeps the median of its rounds.
    runs: list[dict] = []
    for round_ in range(1, args.repeat + 1):
        for mode, todo in (("step", sizes), ("naive", naive_sizes)):
            for size in todo:
                report = measure({**base, "size": size, "mode": mode})
                report["round"] = round_
                runs.append(report)
                print(
                    f"  round {round_}: {mode:<5} {size:>6} px: {report['tiles']:>6} tiles, "
                    f"peak {_peak(report) / MB:8.1f} MB, {report['seconds']:7.1f} s "
                    f"(process {report['process_seconds']:.1f} s)",
                    flush=True,
                )
    if cuda and runs:
        print(f"GPU: {runs[0].get('device_name', '?')}")
    print(f"torch threads: {runs[0]['torch_threads']}")
    print()

    results: dict[tuple[str, int], dict] = {}
    for mode, todo in (("step", sizes), ("naive", naive_sizes)):
        for size in todo:
            done = [r for r in runs if r["mode"] == mode and r["size"] == size]
            peaks = [_peak(r) for r in done]
            results[mode, size] = {
                "mode": mode,
                "size": size,
                "grid": done[0]["grid"],
                "tiles": done[0]["tiles"],
                "baseline": float(statistics.median(_baseline(r) for r in done)),
                "peak": float(statistics.median(peaks)),
                "peak_min": min(peaks),
                "peak_max": max(peaks),
                "seconds": min(r["seconds"] for r in done),
                "cpu_seconds": min(r["cpu_seconds"] for r in done),
            }
    spread = f"{'range MB':>17}" if args.repeat > 1 else ""
    print(
        f"{'method':<7}{'region px':>11}{'grid':>10}{'tiles':>8}{'baseline MB':>13}"
        f"{'peak MB':>10}{spread}{'incr MB':>10}{'U MB':>7}{'step s':>9}{'CPU s':>8}"
    )
    for r in results.values():
        u_mb = r["tiles"] * 512 * 4 / MB
        grid = f"{r['grid'][0]}x{r['grid'][1]}"
        span = f"{r['peak_min'] / MB:>10.1f}-{r['peak_max'] / MB:.1f}" if args.repeat > 1 else ""
        print(
            f"{r['mode']:<7}{r['size']:>6}^2 px{grid:>10}{r['tiles']:>8}"
            f"{r['baseline'] / MB:>13.1f}{r['peak'] / MB:>10.1f}{span}"
            f"{(r['peak'] - r['baseline']) / MB:>10.1f}{u_mb:>7.1f}"
            f"{r['seconds']:>9.1f}{r['cpu_seconds']:>8.1f}"
        )
    print(
        "(peak: median of the rounds; incr MB: peak - baseline; U MB: one copy of the grid's "
        "features, tiles x 512 float32; step s: fastest round)"
    )
    print()

    checks = []
    small, large = results["step", sizes[0]], results["step", sizes[-1]]
    if len(sizes) > 1:
        ratio = large["peak"] / small["peak"]
        ok = ratio <= TARGET_RATIO
        checks.append(
            {
                "ratio": f"peak {sizes[-1]}^2 / peak {sizes[0]}^2",
                "value": ratio,
                "target": TARGET_RATIO,
                "pass": ok,
            }
        )
        print(
            f"step peak {sizes[-1]}^2 / {sizes[0]}^2 px: {ratio:.2f}  "
            f"(target <= {TARGET_RATIO:.2f})  {'PASS' if ok else 'FAIL'}"
        )
        if args.repeat > 1:
            worst = large["peak_max"] / small["peak_min"]
            best = large["peak_min"] / small["peak_max"]
            print(f"  over the rounds' extremes: {best:.2f} to {worst:.2f}  (information)")
        increment = (large["peak"] - large["baseline"]) / max(1, small["peak"] - small["baseline"])
        print(f"step increment {sizes[-1]}^2 / {sizes[0]}^2 px: {increment:.2f}  (information)")
    for size in naive_sizes:
        naive, step = results["naive", size], results["step", size]
        increment = (naive["peak"] - naive["baseline"]) / max(1, step["peak"] - step["baseline"])
        print(
            f"naive / chunked step at {size}^2 px: peak {naive['peak'] / step['peak']:.2f}x, "
            f"increment {increment:.2f}x  (information)"
        )

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "settings": {
                **base,
                "sizes": sizes,
                "naive_sizes": naive_sizes,
                "repeat": args.repeat,
            },
            "peak_measure": unit,
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "results": list(results.values()),
            "runs": runs,
            "checks": checks,
        }
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0 if all(c["pass"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
