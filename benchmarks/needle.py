"""The needle benchmark: grid attention (slide labels only) against the sliding window.

A cohort of synthetic needle-in-a-haystack slides (four classes; the lesions that set
a slide's class cover well under 1% of its tissue) is written with settings FIXED here,
before either model runs (``COHORT``; never tuned to favour a model). Then:

1. grid attention (Tomita et al. 2019) trains on slide labels only: each slide is one
   tissue piece and the lesion boxes are never shown to it;
2. the sliding-window baseline trains a crop classifier on crops cut from the lesion
   boxes (and lesion-free tissue), and tunes its slide heuristic on the validation split;
3. both have the same budget: ``--minutes`` of wall-clock training each on this machine
   (and at most ``--epochs`` epochs), the same tile size and input resolution;
4. both run on the held-out test slides; the paper's Table 2 is printed side by side;
5. attention localisation: for test slides with lesions, the share of attention mass on
   lesion tiles (tiles overlapping a lesion box) for the maps that matter to the
   predicted class (the top ``--top-maps`` by contribution W[c,k]·z_k to its score), and
   for all maps, against chance (the lesion tiles' share of the tissue tiles).

Targets for grid attention: mean F1 >= 0.9 on the test slides; attention mass on lesion
tiles >= 0.5 for the maps that matter. Figures go to docs/benchmarks.md.

Run (CPU, about 30 minutes with the defaults):

    .venv/bin/python benchmarks/needle.py --json data/bench/needle.json

Larger settings for a GPU: ``--minutes 60 --epochs 200 --set tile_um=246 --set input_px=224``
and a bigger cohort (``--per-class train=40 val=10 test=20``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from napari_slide_attention.jobs import run_to_end
from napari_slide_attention.slide.boxes import box_cells
from napari_slide_attention.train.cohort import make_synthetic_cohort
from napari_slide_attention.train.evaluate import evaluate_models
from napari_slide_attention.train.metrics import format_table2

# Fixed before any model ran; documented in docs/benchmarks.md.
COHORT = {
    "size": (4096, 3072),  # level-0 px at 0.5 µm/px
    "n_pieces": 1,  # one tissue piece per slide: piece label = slide label
    "lesion_size": 100,  # px: lesions cover ~0.5-0.6% of the tissue
    "seed": 2026,
}
PER_CLASS = {"train": 10, "val": 3, "test": 6}
# Shared model settings: 128 µm tiles (256 px at 20x) read at 2 µm/px into 64 px inputs
# (a lesion of 100 px is then about 25 px of a 64 px tile; ~60 tiles per slide).
SHARED = {"tile_um": 128.0, "input_px": 64, "seed": 0}
# Grid attention's own settings: Adam at the paper's 1e-3 diverged here with an untrained
# trunk (loss above ln 4, validation mean F1 <= 0.51 over 10 epochs: see
# docs/benchmarks.md); 1e-4 (the paper's value after its first reset) learns. The paper's
# decay of 0.95 per epoch then brings it under 1e-5 by epoch 45 and training stalls
# (training loss ~0.5); 0.99 keeps it learning within the budget.
GRID = {"lr": 1e-4, "lr_decay": 0.99}
TARGET_F1 = 0.9
TARGET_MASS = 0.5


def _progress(name: str):
    last = [0.0]

    def show(event) -> None:
        now = time.perf_counter()
        if event.stage in ("epoch", "resume", "weights", "calibrate", "tune") or (
            now - last[0] > 30 and event.stage == "step"
        ):
            last[0] = now
            print(f"  {name}: {event.message}", flush=True)

    return show


def localisation(result, lesions, top_maps: int) -> dict[str, float] | None:
    """Attention mass on lesion tiles (top maps of the predicted class, all maps), chance."""
    tops, alls, chances = [], [], []
    for piece in result.pieces:
        inside = [(b, c) for b, c in lesions if _overlaps(piece.box, b)]
        if not inside or piece.maps is None:
            continue
        boxes = [b for b, _ in inside]
        cells = box_cells(boxes, piece.grid_origin, piece.tile_size, piece.tissue.shape)
        cells &= piece.tissue
        if not cells.any():
            continue
        mass = piece.maps[:, cells].sum(axis=1)  # (m,)
        contributions = piece.arrays["map_contributions"][result.predicted]  # (m,)
        order = np.argsort(-contributions)[:top_maps]
        tops.append(float(mass[order].mean()))
        alls.append(float(mass.mean()))
        chances.append(float(cells.sum() / piece.tissue.sum()))
    if not tops:
        return None
    return {
        "top_maps": float(np.mean(tops)),
        "all_maps": float(np.mean(alls)),
        "chance": float(np.mean(chances)),
    }


def _overlaps(a, b) -> bool:
    return min(a[0] + a[2], b[0] + b[2]) > max(a[0], b[0]) and min(a[1] + a[3], b[1] + b[3]) > max(
        a[1], b[1]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("data/bench/needle"))
    parser.add_argument("--minutes", type=float, default=13.0, help="training budget per model")
    parser.add_argument("--epochs", type=int, default=120, help="epoch cap per model")
    parser.add_argument("--top-maps", type=int, default=8)
    parser.add_argument("--per-class", nargs="+", default=None, metavar="SPLIT=N")
    parser.add_argument("--skip-train", action="store_true", help="reuse the runs in --dir")
    parser.add_argument("--only", choices=("grid", "sliding-window"), default=None)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="shared model setting override (e.g. tile_um=246)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    from napari_slide_attention.train.grid import GridTrainSettings, train_grid
    from napari_slide_attention.train.sliding_window import (
        SlidingWindowSettings,
        train_sliding_window,
    )

    per = dict(PER_CLASS)
    for item in args.per_class or ():
        split, _, n = item.partition("=")
        per[split] = int(n)
    shared = dict(SHARED)
    for item in args.set:
        key, _, value = item.partition("=")
        shared[key] = json.loads(value)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"python {platform.python_version()}, device {args.device}"
    )
    t0 = time.perf_counter()
    cohort = make_synthetic_cohort(args.dir / "slides", slides_per_class=per, **COHORT)
    print(f"cohort: {len(cohort)} slides {cohort.counts()} ({time.perf_counter() - t0:.0f} s)")
    lesion_fractions = []
    from napari_slide_attention.slide.synthetic import read_sidecar

    for e in cohort:
        info = read_sidecar(e.slide)
        if info["lesions"]:
            lesion_fractions.append(info["lesion_fraction"])
    print(f"lesion share of tissue: {min(lesion_fractions):.4f}-{max(lesion_fractions):.4f}")

    budget_hours = args.minutes / 60
    runs = {}
    models = ["grid", "sliding-window"] if args.only is None else [args.only]
    for name in models:
        run_dir = args.dir / f"run-{name}"
        if name == "grid":
            settings = GridTrainSettings.from_dict(
                {
                    "epochs": args.epochs,
                    "max_hours": budget_hours,
                    "device": args.device,
                    "lesion_labels": False,
                    **GRID,
                    **shared,
                }
            )
            work = train_grid(cohort, run_dir, settings)
        else:
            settings = SlidingWindowSettings.from_dict(
                {
                    "epochs": args.epochs,
                    "max_hours": budget_hours,
                    "device": args.device,
                    "crop_um": shared["tile_um"],
                    "input_px": shared["input_px"],
                    "seed": shared["seed"],
                }
            )
            work = train_sliding_window(cohort, run_dir, settings)
        t = time.perf_counter()
        if not args.skip_train:
            summary = run_to_end(work, _progress(name))
            print(
                f"{name}: {summary.epochs_done} epochs in {(time.perf_counter() - t) / 60:.1f} "
                f"min -> {summary.best}"
            )
        runs[name] = run_dir / "best.safetensors"

    table = {}
    report: dict = {"cohort": {**COHORT, "per_class": per}, "shared": shared, "models": {}}
    for name, path in runs.items():
        locs = []

        def localise(event, name=name, locs=locs) -> None:
            entry = event.data.get("entry")
            if event.stage == "slide" and name == "grid" and entry.lesions:
                loc = localisation(event.data["result"], entry.lesions, args.top_maps)
                if loc:
                    locs.append(loc)

        t = time.perf_counter()
        work = evaluate_models({name: path}, cohort, "test", device=args.device)
        evaluation = run_to_end(work, localise).models[name]
        table[name] = evaluation.metrics
        entry_report = {
            "metrics": evaluation.metrics.to_dict(),
            "checkpoint": str(path),
            "epochs": evaluation.extra.get("epoch", -1) + 1,
            "test_seconds": time.perf_counter() - t,
        }
        if locs:
            entry_report["localisation"] = {
                k: float(np.mean([loc[k] for loc in locs])) for k in locs[0]
            } | {"slides": len(locs)}
        report["models"][name] = entry_report

    print()
    print(format_table2(table))
    checks = []
    if "grid" in table:
        f1 = table["grid"].mean.f1
        checks.append(("grid mean F1", f1, TARGET_F1))
        loc = report["models"]["grid"].get("localisation")
        if loc:
            print(
                f"\nattention mass on lesion tiles ({loc['slides']} test slides with lesions): "
                f"top-{args.top_maps} maps of the predicted class {loc['top_maps']:.3f}, "
                f"all maps {loc['all_maps']:.3f}, chance {loc['chance']:.4f}"
            )
            checks.append(("grid attention mass, top maps", loc["top_maps"], TARGET_MASS))
    return report_checks(checks, report, args.json, width=34, digits=3)


def report_checks(
    checks: list[tuple[str, float, float]],
    report: dict,
    json_path: Path | None,
    *,
    width: int,
    digits: int,
) -> int:
    """Print each (name, value, target) with PASS/FAIL, add them to ``report``, write it
    as JSON when asked; the exit status: 0 when every value reaches its target."""
    print()
    for label, value, target in checks:
        verdict = "PASS" if value >= target else "FAIL"
        print(f"{label:<{width}} {value:6.{digits}f}  (target >= {target})  {verdict}")
    report["checks"] = [{"name": n, "value": v, "target": t, "pass": v >= t} for n, v, t in checks]
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2))
        print(f"wrote {json_path}")
    return 0 if all(v >= t for _, v, t in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
