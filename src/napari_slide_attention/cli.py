"""The ``slide-attention`` command line: everything the GUI does, headless.

Errors end the command with a non-zero status and one readable line on stderr
(``slide-attention: error: PATH: problem``); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__

EXIT_ERROR = 1
EXIT_USAGE = 2


def _open(path: str, mpp: float | None):
    from .slide.reader import MissingMppWarning, open_slide

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MissingMppWarning)
        slide = open_slide(path, mpp=mpp)
    for warning in caught:
        if issubclass(warning.category, MissingMppWarning):
            print(f"slide-attention: warning: {warning.message}", file=sys.stderr)
    return slide


def _tissue_params(args: argparse.Namespace):
    from .slide.tissue import TissueParams

    overrides = {
        name: getattr(args, name)
        for name in (
            "method",
            "mask_mpp",
            "mask_downsample",
            "closing_radius_um",
            "opening_radius_um",
            "min_piece_area_um2",
            "max_hole_area_um2",
        )
        if getattr(args, name, None) is not None
    }
    return TissueParams(**overrides)


def _add_tissue_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tissue detection")
    group.add_argument("--method", choices=("auto", "saturation", "od"), help="thresholding")
    group.add_argument("--mask-mpp", type=float, help="resolution of the mask, µm/px")
    group.add_argument("--mask-downsample", type=float, help="used when the mpp is unknown")
    group.add_argument("--closing-radius-um", type=float)
    group.add_argument("--opening-radius-um", type=float)
    group.add_argument("--min-piece-area-um2", type=float, help="smaller pieces are dropped")
    group.add_argument("--max-hole-area-um2", type=float, help="smaller holes are filled")


def cmd_info(args: argparse.Namespace) -> int:
    from .slide.tissue import tissue_mask

    slide = _open(args.slide, args.mpp)
    facts = slide.describe()
    if not args.no_tissue and slide.rgb:
        mask = tissue_mask(slide, _tissue_params(args))
        facts["tissue_fraction"] = round(float(mask.fraction), 4)
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
        + (f"{facts['tissue_fraction']:.1%}" if facts["tissue_fraction"] is not None else "-"),
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


def cmd_synth(args: argparse.Namespace) -> int:
    from .slide.synthetic import write_synthetic_slide

    width, height = args.size
    info = write_synthetic_slide(
        args.out,
        size=(width, height),
        label=args.label,
        seed=args.seed,
        tile_size=args.tile_size,
        mpp=args.slide_mpp,
        magnification=args.magnification,
    )
    print(
        f"wrote {info.path} ({width} x {height} px, label {info.label}, "
        f"{len(info.lesion_boxes)} lesion(s)); truth in {info.sidecar}"
    )
    return 0


def cmd_tissue(args: argparse.Namespace) -> int:
    import imagecodecs
    import numpy as np

    from .slide.tissue import tile_grid, tissue_mask, tissue_pieces

    slide = _open(args.slide, args.mpp)
    mask = tissue_mask(slide, _tissue_params(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(imagecodecs.png_encode(mask.mask.astype(np.uint8) * 255))
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
    from ._napari.demo import run_demo

    return run_demo(out=Path(args.out), headless=args.headless, size=args.size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slide-attention",
        description="Attention-based classification of whole-slide images (headless tools).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="levels, mpp, magnification, vendor, tiles, tissue")
    info.add_argument("slide")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--mpp", type=float, help="override the slide's µm per pixel")
    info.add_argument("--no-tissue", action="store_true", help="skip the tissue fraction")
    _add_tissue_options(info)
    info.set_defaults(func=cmd_info)

    synth = sub.add_parser("synth", help="write a synthetic needle-in-a-haystack slide")
    synth.add_argument("out", help="output .tif path (the truth goes to OUT.json)")
    synth.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), default=(8192, 8192))
    synth.add_argument("--label", default="carcinoma", help="class name or index")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--tile-size", type=int, default=256)
    synth.add_argument("--slide-mpp", type=float, default=0.5, help="µm per pixel written")
    synth.add_argument("--magnification", type=float, default=20.0)
    synth.set_defaults(func=cmd_synth)

    tissue = sub.add_parser("tissue", help="tissue mask as a PNG, pieces and tile count")
    tissue.add_argument("slide")
    tissue.add_argument("--out", required=True, help="mask PNG to write")
    tissue.add_argument("--mpp", type=float, help="override the slide's µm per pixel")
    tissue.add_argument("--tile-size", type=int, help="also count grid tiles of this size")
    tissue.add_argument("--min-tissue", type=float, default=0.5, help="tile tissue fraction")
    tissue.add_argument("--json", action="store_true")
    _add_tissue_options(tissue)
    tissue.set_defaults(func=cmd_tissue)

    demo = sub.add_parser("demo", help="sample slide in napari (headless: screenshot + report)")
    demo.add_argument("--out", default="out/demo", help="where headless output goes")
    demo.add_argument("--headless", action="store_true", help="no window; write files")
    demo.add_argument("--size", type=int, default=8192, help="sample slide side, px")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .slide.reader import SlideError

    try:
        return int(args.func(args) or 0)
    except (SlideError, ValueError, OSError) as exc:
        if args.debug:
            raise
        print(f"slide-attention: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("slide-attention: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
