"""The dual-attention needle benchmark: dual attention, with and without our two
extensions for sparse lesions, against random sampling and the sliding window on
synthetic needle-in-a-haystack slides.

The cohort is the needle benchmark's (``benchmarks/needle.py``: ``COHORT`` and
``PER_CLASS``, fixed before any model ran; the slides are shared in ``--dir``). Then,
every model with the same cohort, seed and budget (``--soft-epochs`` for a soft
attention, ``--epochs`` for a hard attention):

1. the soft attention trains on slide labels only (L_SA through the expectation over
   sampled tiles; its best epoch by the validation F1 of its own call), twice: as the
   paper has it, and sharper (extension (a): ``SHARPER``, a softmax temperature);
2. the hard attention trains on the N tiles sampled where a soft attention attends (T
   glimpses per tile; the paper trains the parts "separately and together": ``--joint``
   trains each dual model with L_J = L_HA + α^e·L_SA instead), four times: on each soft
   attention, with tiles labelled with their slide's class (the paper) or from the
   lesion boxes (extension (b): a tile takes the class of the lesion it overlaps, the
   lowest-risk class when none, and the slide the highest-risk class of its tiles);
3. the random-sampling baseline trains the same hard-attention classifier on N tiles
   drawn uniformly in the tissue, with either tile labels;
4. the sliding window: the needle benchmark's crop classifier (``run-sliding-window`` in
   ``--dir``, trained with the lesion boxes; skipped when absent) with the paper's slide
   score, the mean of the top-15 tile probabilities per class;
5. on the test slides: F1 (macro over the four classes) and AUROC (macro one-vs-rest), in
   the layout of the paper's Table II, and how often the sampled tiles hit a lesion box
   against tiles drawn uniformly in the tissue (the expected hit rate of the random
   sampler, from ``--random-draws`` draws per slide); then the hit ratio of each soft
   attention's tiles, and of an oracle A that attends only to the cells lesions touch,
   at three distances d_t between tiles (the ceiling the tile geometry allows).

Targets with the extensions: sampled tiles hit lesion boxes >= 5 x as often as uniform
tiles in tissue; dual F1 >= random-sampling F1 + 0.10.

Run (CPU, about 43 minutes on a shared 2-core machine: docs/benchmarks.md; the needle
benchmark's slides and its sliding-window run are reused when present)::

    .venv/bin/python benchmarks/dual_needle.py --json data/bench/dual_needle.json

Settings for a GPU: the paper's sizes, ``--set tile_um=512 --hard glimpse_px=128
--hard tile_px=2048 --hard glimpses=6 --set n_tiles=10 --set feature_px=128`` on 40x
slides (here 0.5 µm/px slides: ``tile_um=256``), more epochs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from napari_slide_attention.inference import predict
from napari_slide_attention.inference.dual import select_tiles
from napari_slide_attention.jobs import run_to_end
from napari_slide_attention.models.checkpoint import load_model, read_checkpoint
from napari_slide_attention.models.dual_attention import DualAttentionConfig
from napari_slide_attention.models.sampling import random_tiles, sample_tiles
from napari_slide_attention.models.soft_attention import pool_tissue
from napari_slide_attention.slide.boxes import box_cells, overlapping
from napari_slide_attention.slide.reader import open_slide
from napari_slide_attention.slide.sampling import read_view, tile_edge_px
from napari_slide_attention.train.cohort import make_synthetic_cohort
from napari_slide_attention.train.dual import CPU_PRESET, DualTrainSettings, train_dual
from napari_slide_attention.train.evaluate import evaluate_models
from needle import COHORT, PER_CLASS, report_checks

# The dual model's settings for 0.5 µm/px synthetic slides on a CPU (fixed before the
# first run; the paper's values are the defaults of DualTrainSettings): the x32 view with
# max-pooling 4 (attention cells of 128 level-0 px), 8 tiles of 128 µm (256 px) read at
# 128 px, 4 glimpses of 32 px at two magnifications. The entropy regulariser's β is 0.01
# (the paper: 1): with β = 1 the entropy term outweighs the classification term and the
# attention stays uniform over the tissue (a joint run's soft loss stayed at -4.06 for
# 9 epochs). The soft attention (and its feature network) learns at 1e-3 instead of the
# paper's 1e-4, from 32 draws of A per slide instead of N = 8: at 1e-4 with 8 draws its
# classification loss stayed at 1.32-1.33 (chance: ln 4 = 1.39) for 23 epochs; with
# ~300 tissue cells and lesions in 1-4 of them, 8 draws from a near-uniform A rarely
# include a lesion, so little signal reached the attention (an exploratory soft-only run
# at these settings went from 1.33 to 0.42 in 86 epochs). An attention cell is tissue
# only when all of its view pixels are (min_tissue 1.0; the default 0.5 let the first
# run's soft attention find a shortcut in cells half on glass at a piece's edge: 0.000
# of A on lesion cells, against 0.294 with 1.0 in the second run).
DUAL = json.loads(json.dumps({**CPU_PRESET, "seed": 0}))
DUAL["model"]["soft"]["min_tissue"] = 1.0
# d_t = 0: lesions here touch 1-4 attention cells, so with tiles kept a cell apart eight
# tiles cannot all lie on one, whatever A is (the oracle ceiling printed by this script:
# 3.90 x uniform at one cell, 5.97 at 0, on the run of 2026-12-07, before any model of
# the 2026-12-08 run was scored). The paper's default, one tile edge, stays the default
# of `train dual`; IHC tumours are large enough for it.
DUAL["model"]["min_distance"] = 0
# Extension (a), the sharper soft attention, as this benchmark runs it (chosen on the
# validation split before the test split was looked at: docs/benchmarks.md).
SHARPER = {"temperature": 0.5}
TARGET_HIT_RATIO = 5.0
TARGET_F1_GAIN = 0.10
# The attention-sampled models: (soft attention, tile labels) of each.
DUAL_MODELS = {
    "dual attention (paper)": ("paper", "slide"),
    "dual + sharper attention (a)": ("sharper", "slide"),
    "dual + region tile labels (b)": ("paper", "regions"),
    "dual + (a) + (b)": ("sharper", "regions"),
}
RANDOM_MODELS = {"random sampling (paper)": "slide", "random sampling + (b)": "regions"}
RUN_DIRS = {
    "dual attention (paper)": "run-dual",
    "dual + sharper attention (a)": "run-dual-a",
    "dual + region tile labels (b)": "run-dual-b",
    "dual + (a) + (b)": "run-dual-ab",
    "random sampling (paper)": "run-random-sampling",
    "random sampling + (b)": "run-random-sampling-b",
}


def _tissue_cells(view, config) -> np.ndarray:
    """The soft attention's tissue cells of a view (the model's pool and min_tissue)."""
    soft = config.soft_config()
    cells = pool_tissue(torch.from_numpy(view.tissue)[None], soft.pool, soft.min_tissue)
    return cells[0].numpy()


def random_hit_rate(entry, config, draws: int, seed: int) -> float:
    """Expected share of uniformly drawn tissue tiles that overlap a lesion box."""
    with open_slide(entry.slide) as slide:
        view = read_view(slide, config.view_downsample)
        tile_px = tile_edge_px(slide, config.tile_um)
        size = slide.dimensions
    tissue = _tissue_cells(view, config)
    pool = config.soft_config().pool
    rng = np.random.default_rng(seed)
    hits, total = 0, 0
    for _ in range(draws):
        picked = random_tiles(
            tissue,
            config.n_tiles,
            cell_size=view.downsample * pool,
            rng=rng,
            tile_size=tile_px,
            slide_size=size,
        )
        hits += int(overlapping(picked.boxes, [b for b, _ in entry.lesions]).sum())
        total += len(picked.boxes)
    return hits / max(total, 1)


def hit_rates_by_distance(
    entry, config, models: dict, distances, draws: int, seed: int, device: torch.device
):
    """Share of sampled tiles on a lesion for each soft attention in ``models`` (name ->
    model) and for an oracle A that lies on the tissue cells the lesion boxes touch, with
    the paper's sampling at each d_t of ``distances`` (None = the tile edge in cells):
    {(name, d_t): share}. The sampling noise is drawn ``draws`` times."""
    with open_slide(entry.slide) as slide:
        view = read_view(slide, config.view_downsample)
        tile_px = tile_edge_px(slide, config.tile_um)
        size = slide.dimensions
    tissue = _tissue_cells(view, config)
    cell = view.downsample * config.soft_config().pool
    lesions = [b for b, _ in entry.lesions]
    oracle = (box_cells(lesions, (0, 0), cell, tissue.shape) & tissue).astype(float)
    oracle = np.where(tissue, oracle + 1e-3, 0.0)  # the rest of the tissue far below
    out = {}
    for distance in distances:
        d = tile_px / cell if distance is None else distance
        for k in range(draws):
            rng = [seed, k]
            picked = sample_tiles(
                oracle / oracle.sum(),
                tissue,
                config.n_tiles,
                cell_size=cell,
                refine=config.refine,
                noise=config.noise,
                distance=d,
                rng=np.random.default_rng(rng),
                tile_size=tile_px,
                slide_size=size,
                candidates=config.candidates,
            )
            share = overlapping(picked.boxes, lesions).mean()
            out.setdefault(("oracle", distance), []).append(share)
            for name, model in models.items():
                model.config.min_distance = d
                chosen = select_tiles(
                    model, view, size, tile_px, np.random.default_rng(rng), device=device
                )
                out.setdefault((name, distance), []).append(
                    overlapping(chosen.boxes, lesions).mean()
                )
    return {key: float(np.mean(v)) for key, v in out.items()}


def attention_on_lesions(result, lesions) -> tuple[float, float, float, float]:
    """Where a dual result's soft attention went on a slide with lesions: the share of A
    on the tissue cells a lesion box touches, those cells' share of the tissue cells
    (what a uniform A would give), the share of A's 8 largest cells that lie on the
    tissue's border (cells with a non-tissue 4-neighbour), and the share of them that a
    lesion touches (where the sampler's first candidates come from)."""
    attention = np.asarray(result.arrays["soft_attention"], dtype=np.float64)
    tissue = np.asarray(result.arrays["soft_tissue"], dtype=bool)
    cell = float(result.info["soft_attention"]["cell_size"])
    on_lesion = np.zeros_like(tissue)
    for (x, y, w, h), _ in lesions:
        r0, r1 = int(y // cell), int((y + h - 1) // cell) + 1
        c0, c1 = int(x // cell), int((x + w - 1) // cell) + 1
        on_lesion[r0:r1, c0:c1] = True
    on_lesion &= tissue
    padded = np.pad(tissue, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    top = np.argsort(-np.where(tissue, attention, -np.inf).ravel())[:8]
    total = attention[tissue].sum()
    return (
        float(attention[on_lesion].sum() / total),
        float(on_lesion.sum() / tissue.sum()),
        float((tissue & ~inner).ravel()[top].mean()),
        float(on_lesion.ravel()[top].mean()),
    )


def _mean_pair(rows: list[tuple[float, ...]]) -> dict | None:
    if not rows:
        return None
    mass, share, border, hits = np.mean(np.asarray(rows), axis=0)
    return {
        "mass_on_lesion_cells": mass,
        "lesion_cells_share": share,
        "top8_on_border": border,
        "top8_on_lesions": hits,
    }


def _progress(name: str):
    def show(event) -> None:
        if event.stage in ("epoch", "resume"):
            print(f"  {name}: {event.message}", flush=True)

    return show


def _train_soft(name: str, cohort, run_dir: Path, settings: DualTrainSettings) -> None:
    """Train one soft attention (in a process of its own with ``--jobs``)."""
    t = time.perf_counter()
    summary = run_to_end(train_dual(cohort, run_dir, settings), _progress(name))
    print(
        f"{name}: {summary.epochs_done} epochs in {(time.perf_counter() - t) / 60:.1f} min "
        f"-> {summary.best}",
        flush=True,
    )


def _pairs(items: list[str]) -> dict:
    """KEY=VALUE (JSON values) pairs as a dict."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = json.loads(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("data/bench/needle"))
    parser.add_argument(
        "--epochs", type=int, default=20, help="hard-attention epochs per model (same budget)"
    )
    parser.add_argument("--soft-epochs", type=int, default=50, help="soft attention first")
    parser.add_argument("--joint", action="store_true", help="train dual jointly instead")
    parser.add_argument("--per-class", nargs="+", default=None, metavar="SPLIT=N")
    parser.add_argument("--skip-train", action="store_true", help="reuse the runs in --dir")
    parser.add_argument("--random-draws", type=int, default=20)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--hard", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--sharper",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"extension (a)'s soft attention settings instead of {SHARPER}",
    )
    parser.add_argument(
        "--jobs", type=int, default=2, help="soft attentions trained at once, one process each"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (1: on a shared 2-core machine two OpenMP threads "
        "made the hard attention's small convolutions 30 x slower)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)

    per = dict(PER_CLASS)
    for item in args.per_class or ():
        split, _, n = item.partition("=")
        per[split] = int(n)
    dual = json.loads(json.dumps(DUAL))
    model_keys = DualTrainSettings.model_keys()
    for key, value in _pairs(args.set).items():  # a model setting goes into "model"
        (dual["model"] if key in model_keys else dual)[key] = value
    dual["model"]["hard"].update(_pairs(args.hard))
    sharper = _pairs(args.sharper) or dict(SHARPER)
    softs = {
        "paper": dict(dual["model"]["soft"]),
        "sharper": {**dual["model"]["soft"], **sharper},
    }
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"python {platform.python_version()}, device {args.device}; "
        f"extension (a): {sharper}"
    )
    t0 = time.perf_counter()
    cohort = make_synthetic_cohort(args.dir / "slides", slides_per_class=per, **COHORT)
    print(f"cohort: {len(cohort)} slides {cohort.counts()} ({time.perf_counter() - t0:.0f} s)")

    def settings(soft: str | None, **values) -> DualTrainSettings:
        """The training settings; ``soft`` None: no model settings (a run with ``init``
        takes the checkpoint's)."""
        model = {**dual["model"], "soft": softs[soft]} if soft is not None else {}
        return DualTrainSettings.from_dict(
            {"device": args.device, **dual, "model": model, **values}
        )

    def train(name: str, run_dir: Path, trained: DualTrainSettings, init=None) -> None:
        if args.skip_train:
            return
        t = time.perf_counter()
        summary = run_to_end(train_dual(cohort, run_dir, trained, init=init), _progress(name))
        print(
            f"{name}: {summary.epochs_done} epochs in {(time.perf_counter() - t) / 60:.1f} "
            f"min -> {summary.best}"
        )

    # 1. the soft attentions (not with --joint: each dual model then trains its own), side
    # by side in --jobs processes (they do not depend on each other)
    soft_dirs = {"paper": args.dir / "run-dual-soft", "sharper": args.dir / "run-dual-soft-a"}
    if not args.joint and not args.skip_train:
        jobs = [
            (
                f"soft attention ({soft})",
                cohort,
                run_dir,
                settings(soft, epochs=args.soft_epochs, mode="soft"),
            )
            for soft, run_dir in soft_dirs.items()
        ]
        t = time.perf_counter()
        if args.jobs > 1:
            context = multiprocessing.get_context("spawn")
            with context.Pool(
                args.jobs, initializer=torch.set_num_threads, initargs=(args.threads,)
            ) as pool:
                pool.starmap(_train_soft, jobs)
        else:
            for job in jobs:
                _train_soft(*job)
        print(f"soft attentions: {(time.perf_counter() - t) / 60:.1f} min")
    # 2. and 3. the hard attentions, on attention-sampled and on random tiles
    checkpoints = {}
    for name, (soft, labels) in DUAL_MODELS.items():
        run_dir = args.dir / RUN_DIRS[name]
        mode = "joint" if args.joint else "hard"
        # the hard attention starts from the soft attention's best epoch (by its own call)
        init = None if args.joint else soft_dirs[soft] / "best.safetensors"
        trained = settings(
            soft if init is None else None, epochs=args.epochs, mode=mode, tile_labels=labels
        )
        train(name, run_dir, trained, init)
        checkpoints[name] = (run_dir / "best.safetensors", "attention")
    for name, labels in RANDOM_MODELS.items():
        run_dir = args.dir / RUN_DIRS[name]
        trained = settings(
            "paper", epochs=args.epochs, mode="hard", sampler="random", tile_labels=labels
        )
        train(name, run_dir, trained)
        checkpoints[name] = (run_dir / "best.safetensors", "random")
    trained_minutes = (time.perf_counter() - started) / 60

    # 4. and 5. the test split
    test = cohort.split("test")
    report: dict = {
        "cohort": {**COHORT, "per_class": per},
        "dual": dual,
        "sharper": sharper,
        "epochs": args.epochs,
        "soft_epochs": args.soft_epochs,
        "joint": args.joint,
        "models": {},
    }
    table = {}
    hit_rates = {}
    for name, (path, sampler) in checkpoints.items():
        hits, masses = [], []

        def sampled(model, entry, k, sampler=sampler):
            return predict(model, entry.slide, device=args.device, sampler=sampler, seed=k)

        def lesion_hits(event, sampler=sampler, hits=hits, masses=masses) -> None:
            entry = event.data.get("entry")
            if event.stage == "slide" and entry.lesions:
                result = event.data["result"]
                boxes = result.arrays["tile_boxes"]
                hits.append(overlapping(boxes, [b for b, _ in entry.lesions]).mean())
                if sampler == "attention":
                    masses.append(attention_on_lesions(result, entry.lesions))

        t = time.perf_counter()
        # the slide's call: the most frequent tile class (the highest-risk one with (b))
        work = evaluate_models(
            {name: path}, cohort, "test", device=args.device, predict_slide=sampled
        )
        evaluation = run_to_end(work, lesion_hits).models[name]
        table[name] = evaluation.metrics
        hit_rates[name] = float(np.mean(hits)) if hits else float("nan")
        report["models"][name] = {
            "metrics": table[name].to_dict(),
            "hit_rate": hit_rates[name],
            "epochs": evaluation.extra.get("epoch", -1) + 1,
            "soft_attention_on_lesions": _mean_pair(masses),
            "test_seconds": time.perf_counter() - t,
        }

    sw_path = args.dir / "run-sliding-window" / "best.safetensors"
    sw_name = "sliding window (top-15 mean)"
    if sw_path.exists():
        t = time.perf_counter()
        work = evaluate_models(
            {sw_name: sw_path},
            cohort,
            "test",
            device=args.device,
            predict_slide=lambda model, entry, k: predict(
                model, entry.slide, device=args.device, aggregation="top-k-mean"
            ),
        )
        table[sw_name] = run_to_end(work).models[sw_name].metrics
        report["models"][sw_name] = {
            "metrics": table[sw_name].to_dict(),
            "checkpoint": str(sw_path),
            "test_seconds": time.perf_counter() - t,
        }
    else:
        print(f"sliding window: {sw_path} not found (run benchmarks/needle.py first); skipped")

    # the random sampler's expected hit rate on the dual model's geometry
    paper_path = checkpoints["dual attention (paper)"][0]
    config = DualAttentionConfig.from_dict(read_checkpoint(paper_path, tensors=False).config)
    with_lesions = [(k, e) for k, e in enumerate(test) if e.lesions]
    chance = float(
        np.mean([random_hit_rate(e, config, args.random_draws, k) for k, e in with_lesions])
    )
    report["random_hit_rate_expected"] = chance

    # each soft attention's tiles, and an oracle's, at three distances between tiles
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    softs_loaded = {
        "paper A": load_model(checkpoints["dual attention (paper)"][0], device)[0].eval(),
        "sharper A (a)": load_model(checkpoints["dual + (a) + (b)"][0], device)[0].eval(),
    }
    distances = (None, 1.0, 0.0)
    by_distance: dict = {}
    for k, entry in with_lesions:
        rates = hit_rates_by_distance(entry, config, softs_loaded, distances, 5, k, device)
        for key, value in rates.items():
            by_distance.setdefault(key, []).append(value)
    by_distance = {key: float(np.mean(v)) for key, v in by_distance.items()}
    report["hit_rates_by_distance"] = [
        {"attention": name, "distance_cells": d, "hit_rate": v, "ratio": v / max(chance, 1e-9)}
        for (name, d), v in by_distance.items()
    ]

    print()
    print(f"{'method':<32}{'F1 (macro)':>12}{'AUROC':>8}{'lesion hits':>13}{'ratio':>7}")
    for name, metrics in table.items():
        hit = hit_rates.get(name)
        shown = f"{hit:13.3f}{hit / max(chance, 1e-9):7.2f}" if hit is not None else ""
        auroc = metrics.auroc if metrics.auroc is not None else float("nan")
        print(f"{name:<32}{metrics.mean.f1:12.2f}{auroc:8.2f}{shown}")
    print(f"{'uniform tiles in tissue':<32}{'':>12}{'':>8}{chance:13.3f}  (expected)")
    for name in ("dual attention (paper)", "dual + sharper attention (a)"):
        soft = report["models"][name]["soft_attention_on_lesions"]
        if soft:
            print(
                f"{name}, soft attention on the test slides with lesions: "
                f"{soft['mass_on_lesion_cells']:.3f} of A on the cells lesions touch (their "
                f"share of the tissue cells: {soft['lesion_cells_share']:.3f}); of A's 8 "
                f"largest cells {soft['top8_on_border']:.0%} on the tissue's border, "
                f"{soft['top8_on_lesions']:.0%} touched by a lesion"
            )
    print("\nlesion hits / uniform by the distance d_t between sampled tiles (cells):")
    names = [*softs_loaded, "oracle"]
    print(f"{'d_t':<12}" + "".join(f"{n:>16}" for n in names))
    for d in distances:
        label = "tile edge" if d is None else f"{d:g}"
        cells = "".join(f"{by_distance[(n, d)] / max(chance, 1e-9):16.2f}" for n in names)
        print(f"{label:<12}{cells}")
    total_minutes = (time.perf_counter() - started) / 60
    print(f"\ntrained in {trained_minutes:.1f} min; all in {total_minutes:.1f} min")
    report["minutes"] = {"training": trained_minutes, "total": total_minutes}

    def gain(a: str, b: str) -> float:
        return table[a].mean.f1 - table[b].mean.f1

    both = "dual + (a) + (b)"
    paper_ratio = hit_rates["dual attention (paper)"] / max(chance, 1e-9)
    paper_gain = gain("dual attention (paper)", "random sampling (paper)")
    print(f"the paper's method: lesion hits / uniform {paper_ratio:.2f}, F1 gain {paper_gain:+.2f}")
    checks = [
        ("(a)+(b): lesion hits / uniform", hit_rates[both] / max(chance, 1e-9), TARGET_HIT_RATIO),
        (
            "(a)+(b) F1 - random sampling + (b) F1",
            gain(both, "random sampling + (b)"),
            TARGET_F1_GAIN,
        ),
        ("(a)+(b) F1 - random sampling F1", gain(both, "random sampling (paper)"), TARGET_F1_GAIN),
    ]
    return report_checks(checks, report, args.json, width=40, digits=2)


if __name__ == "__main__":
    sys.exit(main())
