"""The ``slide-attention`` argument parser: every subcommand and the option groups they
share (tissue detection), and what those groups' options make (``tissue_params``).

The commands themselves live by topic in ``slides.py``, ``models.py`` and ``labels.py``;
the parser only names them, so that ``--help`` imports no torch.
"""

from __future__ import annotations

import argparse
import math
import re

from .. import __version__

__all__ = ["add_tissue_options", "build_parser", "check_options", "tissue_params"]

_TISSUE_OPTIONS = (
    "method",
    "mask_mpp",
    "mask_downsample",
    "closing_radius_um",
    "opening_radius_um",
    "min_piece_area_um2",
    "max_hole_area_um2",
)


def add_tissue_options(parser: argparse.ArgumentParser) -> None:
    """Adds the tissue-detection options (read back by :func:`tissue_params`)."""
    group = parser.add_argument_group("tissue detection")
    group.add_argument("--method", choices=("auto", "saturation", "od"), help="thresholding")
    group.add_argument("--mask-mpp", type=float, help="resolution of the mask, µm/px")
    group.add_argument("--mask-downsample", type=float, help="used when the mpp is unknown")
    group.add_argument("--closing-radius-um", type=float)
    group.add_argument("--opening-radius-um", type=float)
    group.add_argument("--min-piece-area-um2", type=float, help="smaller pieces are dropped")
    group.add_argument("--max-hole-area-um2", type=float, help="smaller holes are filled")
    group.add_argument(
        "--tissue",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any tissue parameter (JSON value), e.g. --tissue smooth_sigma_um=4",
    )


def tissue_params(args: argparse.Namespace):
    """Returns the ``TissueParams`` of the tissue options given (defaults elsewhere)."""
    import json
    from dataclasses import fields

    from ..slide.tissue import TissueParams

    names = {f.name for f in fields(TissueParams)}
    overrides = {}
    for pair in getattr(args, "tissue", None) or ():
        name, sep, text = pair.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in names:
            raise ValueError(
                f"--tissue takes NAME=VALUE with NAME one of {', '.join(sorted(names))}; "
                f"got {pair!r}"
            )
        try:
            overrides[name] = json.loads(text)
        except json.JSONDecodeError:
            overrides[name] = text
    overrides.update(
        {
            name: getattr(args, name)
            for name in _TISSUE_OPTIONS
            if getattr(args, name, None) is not None
        }
    )
    try:
        return TissueParams(**overrides)
    except TypeError as exc:  # a value of the wrong type
        raise ValueError(f"tissue parameters: {exc}") from exc


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_options(args: argparse.Namespace) -> None:
    """Refuses option values no work could use, before any work (and before torch loads):
    pixel sizes outside what a microscope gives, a device this tool does not run on, tissue
    parameters out of their bounds.

    Raises:
        ValueError: one line naming the option and the value.
    """
    from ..slide.reader import MAX_MPP, MIN_MPP

    for name in ("mpp", "slide_mpp"):
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and MIN_MPP <= value <= MAX_MPP):
            raise ValueError(
                f"--{name.replace('_', '-')} {value:g}: a slide's pixel size is "
                f"{MIN_MPP:g} to {MAX_MPP:g} µm/px (0.25 at 40x, 0.5 at 20x)"
            )
    device = getattr(args, "device", None)
    if device is not None and not _DEVICE.fullmatch(str(device)):
        raise ValueError(f"--device {device}: this tool runs on auto, cpu or cuda[:N]")
    if any(hasattr(args, name) for name in _TISSUE_OPTIONS):
        tissue_params(args)


def build_parser() -> argparse.ArgumentParser:
    """Returns the parser of every subcommand; ``args.func(args)`` runs the one chosen."""
    from . import labels, models, slides

    parser = argparse.ArgumentParser(
        prog="slide-attention",
        description="Attention-based classification of whole-slide images (headless tools).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # -- slides ---------------------------------------------------------------------------
    info = sub.add_parser("info", help="levels, mpp, magnification, vendor, tiles, tissue")
    info.add_argument("slide")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--mpp", type=float, help="override the slide's µm per pixel")
    info.add_argument("--no-tissue", action="store_true", help="skip the tissue fraction")
    add_tissue_options(info)
    info.set_defaults(func=slides.cmd_info)

    synth = sub.add_parser(
        "synth", help="write a synthetic slide: H&E needle in a haystack, or HER2/MMR IHC"
    )
    synth.add_argument("out", help="output .tif path (the truth goes to OUT.json)")
    synth.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), default=(8192, 8192))
    synth.add_argument(
        "--stain",
        default="he",
        help="he (needle-in-a-haystack H&E, the default), her2 (membrane IHC scored 0, 1+, "
        "2+, 3+) or mmr (nuclear IHC, intact or loss)",
    )
    synth.add_argument(
        "--label",
        help="class name or index (default: carcinoma for he, the highest class for IHC)",
    )
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--tile-size", type=int, default=256)
    synth.add_argument("--slide-mpp", type=float, default=0.5, help="µm per pixel written")
    synth.add_argument("--magnification", type=float, default=20.0)
    synth.set_defaults(func=slides.cmd_synth)

    tissue = sub.add_parser("tissue", help="tissue mask as a PNG, pieces and tile count")
    tissue.add_argument("slide")
    tissue.add_argument("--out", required=True, help="mask PNG to write")
    tissue.add_argument("--mpp", type=float, help="override the slide's µm per pixel")
    tissue.add_argument("--tile-size", type=int, help="also count grid tiles of this size")
    tissue.add_argument("--min-tissue", type=float, default=0.5, help="tile tissue fraction")
    tissue.add_argument("--json", action="store_true")
    add_tissue_options(tissue)
    tissue.set_defaults(func=slides.cmd_tissue)

    cohort = sub.add_parser(
        "synth-cohort", help="write a cohort of synthetic slides (H&E or IHC) + CSV"
    )
    cohort.add_argument("out", help="output folder (cohort.csv and the slides)")
    cohort.add_argument(
        "--per-class",
        nargs="+",
        default=["train=4", "val=2", "test=2"],
        metavar="SPLIT=N",
        help="slides per class and split",
    )
    cohort.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), default=(3072, 2048))
    cohort.add_argument("--seed", type=int, default=0)
    cohort.add_argument(
        "--stain",
        default="he",
        help="he (needle slides, the default), her2 or mmr (IHC slides: the classes are the "
        "stain's, its settings fixed and recorded in OUT/synthetic-cohort.json)",
    )
    cohort.add_argument("--lesion-size", type=int, default=100, help="he: lesion side, level-0 px")
    cohort.add_argument("--n-pieces", type=int, help="tissue pieces per slide (default 1-3)")
    cohort.set_defaults(func=slides.cmd_synth_cohort)

    # -- models ---------------------------------------------------------------------------
    train = sub.add_parser("train", help="train a model on a cohort (grid, dual, sliding-window)")
    train.add_argument("model", choices=("grid", "dual", "sliding-window"))
    train.add_argument("--cohort", required=True, help="cohort CSV (slide,label,split,...)")
    train.add_argument("--out", required=True, help="run folder: checkpoints, logs")
    train.add_argument("--classes", help="class names, lowest to highest risk, comma-separated")
    train.add_argument(
        "--mpp", type=float, help="µm per pixel for every slide (for files that lack it)"
    )
    train.add_argument("--epochs", type=int)
    train.add_argument("--lr", type=float, help="initial learning rate")
    train.add_argument("--mode", choices=("joint", "soft", "hard"), help="dual: what trains")
    train.add_argument(
        "--sampler", choices=("attention", "random"), help="dual: tile sampling (random = baseline)"
    )
    train.add_argument("--n-tiles", type=int, help="dual: tiles sampled per slide (10)")
    train.add_argument(
        "--stain",
        choices=("her2", "mmr"),
        help="dual: the paper's tile sampling for this stain (HER2: noise [0, 1], adaptive "
        "threshold, N 10 of 20; MMR: noise [-2, 1], k-means, N 15 of 30); options and --set "
        "given beside it win",
    )
    train.add_argument(
        "--tile-labels",
        choices=("slide", "regions"),
        help="dual: label each sampled tile with its slide's class (slide, the paper) or with "
        "the class of the lesion boxes / --labels regions it overlaps, the lowest-risk class "
        "when none (regions, ours, for sparse lesions; the slide takes its highest-risk tile)",
    )
    train.add_argument(
        "--attention-temperature",
        type=float,
        metavar="T",
        help="dual: soft attention A = softmax(logits / T); T < 1 sharpens it (1, the paper)",
    )
    train.add_argument(
        "--attention-top-k",
        type=int,
        metavar="K",
        help="dual: keep only A's K largest cells, renormalised (0 = all, the paper)",
    )
    train.add_argument("--samples-per-step", type=int, help="grid: pieces per optimiser step")
    train.add_argument("--batch-size", type=int, help="sliding window: crops per step")
    train.add_argument("--n-maps", type=int, help="grid: attention maps (64)")
    train.add_argument("--tile-um", type=float, help="tile (crop) edge in µm (246)")
    train.add_argument("--input-px", type=int, help="tile edge fed to the network (224)")
    train.add_argument("--chunk-tiles", type=int, help="tiles per forward chunk")
    train.add_argument("--trainable-blocks", type=int, help="trunk stages that train")
    train.add_argument("--weights", help="pretrained trunk weights (local file)")
    train.add_argument("--init", help="grid, dual: start from this checkpoint (fine-tune)")
    train.add_argument("--device", help="auto, cpu or cuda")
    train.add_argument("--amp", action="store_true", help="mixed precision")
    train.add_argument("--seed", type=int)
    train.add_argument("--no-resume", action="store_true", help="start over in --out")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other training setting (JSON value), e.g. --set lr_decay=0.9",
    )
    train.add_argument("--quiet", action="store_true")
    train.add_argument(
        "--labels",
        metavar="DB",
        help="label store (slide-attention labels): its slide labels and regions replace "
        "the cohort's",
    )
    train.add_argument(
        "--events",
        action="store_true",
        help="print progress as JSON lines on stdout (for programs) instead of text",
    )
    folds = train.add_argument_group(
        "cross-validation",
        "--folds K trains K runs, OUT/fold-1 ... OUT/fold-K, on stratified folds that keep "
        "every case in one fold (the cohort's split column is not used); each fold's "
        "cohort.csv says which slides it trains, validates and tests on. "
        "`evaluate --folds K --model OUT` then gives the mean ± std table.",
    )
    folds.add_argument("--folds", type=int, metavar="K", help="k-fold cross-validation")
    folds.add_argument("--fold-seed", type=int, default=0, help="seed of the fold shuffle (0)")
    folds.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="share of each fold's other cases held out for validation (0.2; 0 = none)",
    )
    add_tissue_options(train)
    train.set_defaults(func=models.cmd_train)

    predict = sub.add_parser("predict", help="run a trained model on a slide; save the result")
    predict.add_argument("--model", required=True, help="checkpoint (.safetensors)")
    predict.add_argument("--slide", required=True)
    predict.add_argument("--out", required=True, help="result folder (result.json + zarr)")
    predict.add_argument("--device", default="auto", help="auto, cpu or cuda")
    predict.add_argument(
        "--aggregation",
        choices=("highest-risk", "mean", "max", "thresholds", "top-k-mean"),
        help="grid: how pieces make the call; sliding window: thresholds or top-k-mean",
    )
    predict.add_argument("--amp", action="store_true", help="mixed precision")
    predict.add_argument("--mpp", type=float, help="override the slide's µm per pixel")
    predict.add_argument("--json", action="store_true")
    predict.add_argument("--quiet", action="store_true")
    add_tissue_options(predict)
    predict.set_defaults(func=models.cmd_predict)

    evaluate = sub.add_parser("evaluate", help="Table-2 metrics of models on a cohort split")
    evaluate.add_argument(
        "--model",
        required=True,
        action="append",
        help="checkpoint (repeat); with --folds, a run folder of `train --folds`",
    )
    evaluate.add_argument("--cohort", required=True)
    evaluate.add_argument("--split", default="test", choices=("train", "val", "test"))
    evaluate.add_argument("--classes", help="class names, lowest to highest risk")
    evaluate.add_argument(
        "--labels", help="label store: its corrected slide labels are the truth (SQLite)"
    )
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument(
        "--mpp", type=float, help="µm per pixel for every slide (for files that lack it)"
    )
    evaluate.add_argument("--json", action="store_true")
    evaluate.add_argument("--quiet", action="store_true")
    evaluate.add_argument(
        "--folds",
        type=int,
        metavar="K",
        help="cross-validation: each --model is a run folder of `train --folds K`; every "
        "fold's best checkpoint runs on that fold's test slides (--split does not apply) "
        "and F1 and AUROC are given as mean ± std over the folds (Table II of Raza et al.)",
    )
    evaluate.add_argument(
        "--her2-points",
        metavar="FILE",
        help="also score the HER2 contest's criteria (agreement points, combined points) "
        "with this points table (JSON: source, points); the classes must be HER2 scores "
        "0, 1+, 2+, 3+",
    )
    evaluate.add_argument(
        "--her2-weights",
        metavar="FILE",
        help="with --her2-points: the weights of the weighted confidence (JSON, like the "
        "points; may be negative)",
    )
    add_tissue_options(evaluate)
    evaluate.set_defaults(func=models.cmd_evaluate)

    # -- labels ---------------------------------------------------------------------------
    label_parser = sub.add_parser("labels", help="a cohort's label store: export, import, show")
    labels_sub = label_parser.add_subparsers(dest="labels_command", required=True, metavar="ACTION")
    export = labels_sub.add_parser("export", help="regions as QuPath GeoJSON, or labels as CSV")
    export.add_argument("--store", required=True, help="label store (.labels.sqlite)")
    what = export.add_mutually_exclusive_group(required=True)
    what.add_argument("--geojson", metavar="OUT", help="write the regions as GeoJSON")
    what.add_argument("--csv", metavar="OUT", help="write slide labels and regions as CSV")
    export.add_argument("--slide", help="GeoJSON: only this slide's regions")
    export.set_defaults(func=labels.cmd_labels_export)
    imported = labels_sub.add_parser("import", help="regions from a GeoJSON file (QuPath's)")
    imported.add_argument("--store", required=True, help="label store (created if missing)")
    imported.add_argument("--geojson", required=True, metavar="IN")
    imported.add_argument("--slide", required=True, help="the slide the regions belong to")
    imported.add_argument("--author", help="who the regions are by (default: login name)")
    imported.set_defaults(func=labels.cmd_labels_import)
    show = labels_sub.add_parser("show", help="slide labels and regions as a table")
    show.add_argument("--store", required=True)
    show.add_argument("--slide", help="one slide: its label, note and regions")
    show.add_argument("--history", action="store_true", help="also every change")
    show.set_defaults(func=labels.cmd_labels_show)

    # -- the viewer -----------------------------------------------------------------------
    demo = sub.add_parser("demo", help="sample slide in napari (headless: screenshot + report)")
    demo.add_argument("--out", default="out/demo", help="where headless output goes")
    demo.add_argument("--headless", action="store_true", help="no window; write files")
    demo.add_argument("--size", type=int, default=8192, help="sample slide side, px")
    demo.set_defaults(func=slides.cmd_demo)
    return parser
