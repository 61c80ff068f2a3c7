"""Commands about slides: ``info``, ``synth``, ``synth-cohort``, ``tissue``, and ``demo``
(a sample slide in napari)."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from .parser import tissue_params

__all__ = ["cmd_demo", "cmd_info", "cmd_synth", "cmd_synth_cohort", "cmd_tissue", "open_slide"]


def open_slide(path: str, mpp: float | None):
    """Returns the opened slide; a missing mpp is a warning line on stderr."""
    from ..slide import reader

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", reader.MissingMppWarning)
        slide = reader.open_slide(path, mpp=mpp)
    for warning in caught:
        if issubclass(warning.category, reader.MissingMppWarning):
            print(f"slide-attention: warning: {warning.message}", file=sys.stderr)
    return slide


def cmd_info(args: argparse.Namespace) -> int:
    """Prints a slide's facts (text or JSON); returns the exit status."""

    from ..slide.tissue import tissue_mask

    slide = open_slide(args.slide, args.mpp)
    facts = slide.describe()
    if not args.no_tissue and slide.rgb:
        mask = tissue_mask(slide, tissue_params(args))
        facts["tissue_fraction"] = float(f"{mask.fraction:.4g}")
    else:
        facts["tissue_fraction"] = None
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    width, height = facts["dimensions"]
    mpp = facts["mpp"]
    lines = [
        f"{facts['path']}",
        f"  vendor         {facts['vendor']}",
        f"  dimensions     {width} x {height} px ({facts['channels']} x {facts['dtype']}"
        f"{', RGB' if facts['rgb'] else ''})",
        "  mpp            "
        + (f"{mpp[0]:.4f} x {mpp[1]:.4f} µm/px ({facts['mpp_source']})" if mpp else "unknown"),
        "  magnification  "
        + (f"{facts['magnification']:g}x" if facts["magnification"] else "unknown"),
        "  tile size      "
        + ("x".join(str(v) for v in facts["tile_shape"][::-1]) if facts["tile_shape"] else "-"),
        "  tissue         "
        + (_share(facts["tissue_fraction"]) if facts["tissue_fraction"] is not None else "-"),
        f"  associated     {', '.join(facts['associated']) or '-'}",
        "  levels",
    ]
    for level in facts["levels"]:
        h, w = level["shape"]
        tile = "x".join(str(v) for v in level["tile_shape"][::-1]) if level["tile_shape"] else "-"
        level_mpp = f"{level['mpp'][0]:.3f} µm/px" if level["mpp"] else ""
        virtual = " (computed)" if level["virtual"] else ""
        lines.append(
            f"    {level['index']}: {w} x {h}  downsample {level['downsample']:g}  "
            f"tiles {tile}  {level_mpp}{virtual}"
        )
    for note in facts["notes"]:
        lines.append(f"  note: {note}")
    print("\n".join(lines))
    return 0


def _share(fraction: float) -> str:
    """A share as a percentage that never reads 0.0 % for a little tissue on much glass."""
    if 0 < fraction < 0.001:
        return f"{fraction * 100:.2g}%"
    return f"{fraction:.1%}"


def cmd_synth(args: argparse.Namespace) -> int:
    """Writes a synthetic slide and its truth; returns the exit status."""

    from ..slide.synthetic import write_synthetic_slide

    width, height = args.size
    info = write_synthetic_slide(
        args.out,
        size=(width, height),
        label=args.label,
        seed=args.seed,
        stain=args.stain,
        tile_size=args.tile_size,
        mpp=args.slide_mpp,
        magnification=args.magnification,
    )
    if info.stain == "he":
        found = f"label {info.label}, {len(info.lesion_boxes)} lesion(s)"
    else:
        from ..slide.synthetic import read_sidecar

        share = read_sidecar(info.sidecar)["tumour_fraction"]
        found = (
            f"{info.stain} {info.label}, tumour {share:.0%} of the tissue in "
            f"{len(info.tumour_boxes)} region(s), {len(info.artefact_boxes)} distractor(s)"
        )
    print(f"wrote {info.path} ({width} x {height} px, {found}); truth in {info.sidecar}")
    return 0


def cmd_synth_cohort(args: argparse.Namespace) -> int:
    """Writes a cohort of synthetic slides and its CSV; returns the exit status."""

    from ..train.cohort import make_synthetic_cohort

    per = {}
    for item in args.per_class:
        split, sep, n = item.partition("=")
        if not sep or not n.strip().isdigit():
            raise ValueError(f"--per-class takes SPLIT=N (e.g. train=4), got {item!r}")
        per[split] = int(n)
    cohort = make_synthetic_cohort(
        args.out,
        slides_per_class=per,
        size=tuple(args.size),
        seed=args.seed,
        lesion_size=args.lesion_size,
        n_pieces=args.n_pieces,
        stain=args.stain,
    )
    print(f"{cohort.path}: {len(cohort)} slides")
    for split, counts in cohort.counts().items():
        print(f"  {split:<5} " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def cmd_tissue(args: argparse.Namespace) -> int:
    """Writes a slide's tissue mask as a PNG and prints its pieces; returns the exit status."""
    import imagecodecs
    import numpy as np

    from ..files import atomic_write_bytes
    from ..slide.tissue import tile_grid, tissue_mask, tissue_pieces

    slide = open_slide(args.slide, args.mpp)
    mask = tissue_mask(slide, tissue_params(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, imagecodecs.png_encode(mask.mask.astype(np.uint8) * 255))
    pieces = tissue_pieces(mask, mpp=slide.mpp)
    summary: dict[str, Any] = {
        "slide": str(slide.path),
        "mask": str(out),
        "mask_shape": list(mask.mask.shape),
        "mask_downsample": mask.downsample,
        "tissue_fraction": round(float(mask.fraction), 4),
        "pieces": [{"label": p.label, "box": [int(v) for v in p.box]} for p in pieces],
    }
    if args.tile_size:
        grid = tile_grid(mask, args.tile_size, min_tissue=args.min_tissue)
        summary["tiles"] = len(grid)
        summary["tile_size"] = args.tile_size
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"wrote {out} ({mask.mask.shape[1]} x {mask.mask.shape[0]} px, 1 px = "
            f"{mask.downsample:g} level-0 px); tissue {mask.fraction:.1%} in {len(pieces)} piece(s)"
            + (f"; {summary['tiles']} tiles of {args.tile_size} px" if args.tile_size else "")
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Opens the sample slide in napari (headless: screenshots, report); returns the status."""

    from .._napari.demo import run_demo

    return run_demo(out=Path(args.out), headless=args.headless, size=args.size)
