"""The reading half of tests/slide/test_fuzz_tiff.py, run in a child process.

Reads one JSON request a line on stdin and answers one JSON line on stdout, so the test
can time each case and kill this process when a case hangs (a hang in C code too), and
see it die. A request is ``{"path": ..., "reference": ...}``; with a reference (the intact
file a truncated ``path`` was cut from) every stored tile that reads must equal the
reference's, else the answer is "wrong".

Answers: ``{"outcome": "ok"}``; ``{"outcome": "slide_error", "stage": ..., "message": ...,
"names_file": ...}``; ``{"outcome": "other", "type": ..., "message": ..., "traceback": ...}``;
``{"outcome": "wrong", "message": ...}``.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import traceback
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

from napari_slide_attention.slide.reader import SlideError, open_slide
from napari_slide_attention.slide.stream import TileStream
from napari_slide_attention.slide.tissue import tissue_mask

# Region reads per level stay this small, whatever size a file claims.
_READ_SIDE = 256
# Tissue detection runs on slides up to this many level-0 pixels (it reads all of them).
_TISSUE_PIXELS = 1 << 22

_references: dict[str, list[np.ndarray]] = {}


class Wrong(Exception):
    """Pixels that read without error but differ from the intact file's."""


def main() -> None:
    warnings.simplefilter("ignore")
    print(json.dumps({"ready": True, "peak_rss_mib": _peak_rss_mib()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        answer = handle(request["path"], request.get("reference"))
        answer["peak_rss_mib"] = _peak_rss_mib()
        print(json.dumps(answer), flush=True)


def _peak_rss_mib() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def handle(path: str, reference: str | None) -> dict:
    stage = "open"
    try:
        slide = open_slide(path)
        try:
            stage = "read"
            slide.describe()
            if reference is None:
                _read_corners(slide)
            else:
                _read_against(slide, _reference_levels(reference))
            for name in slide.associated:
                slide.associated[name]
            stage = "stream"
            _stream(slide)
            stage = "tissue"
            height, width = slide.level_info[0].shape
            if height * width <= _TISSUE_PIXELS:
                tissue_mask(slide)
            stage = "rgb"
            if slide.rgb:
                slide.require_rgb()
            else:
                stage = "rgb-refused"
                slide.require_rgb()
                raise AssertionError("require_rgb accepted a slide that is not RGB")
        finally:
            slide.close()
    except SlideError as exc:
        return {
            "outcome": "slide_error",
            "stage": stage,
            "message": str(exc),
            "names_file": str(exc).startswith(f"{path}: ") and bool(exc.problem.strip()),
        }
    except Wrong as exc:
        return {"outcome": "wrong", "stage": stage, "message": str(exc)}
    except BaseException as exc:
        return {
            "outcome": "other",
            "stage": stage,
            "type": type(exc).__name__,
            "message": str(exc)[:500],
            "traceback": traceback.format_exc()[-3000:],
        }
    return {"outcome": "ok", "stage": stage}


def _read_corners(slide) -> None:
    """Read the top-left and bottom-right corners of every level."""
    for level, info in enumerate(slide.level_info):
        height, width = info.shape
        sy = slide.level_info[0].shape[0] / height
        sx = slide.level_info[0].shape[1] / width
        side_x, side_y = min(width, _READ_SIDE), min(height, _READ_SIDE)
        w0, h0 = max(1, round(side_x * sx)), max(1, round(side_y * sy))
        slide.read_region(level, 0, 0, w0, h0)
        slide.read_region(
            level, round((width - side_x) * sx), round((height - side_y) * sy), w0, h0
        )


def _reference_levels(reference: str) -> list[np.ndarray]:
    if reference not in _references:
        with open_slide(reference) as intact:
            _references[reference] = [
                intact.levels[i].compute(scheduler="sync")
                for i, info in enumerate(intact.level_info)
                if not info.virtual
            ]
    return _references[reference]


def _read_against(slide, references: list[np.ndarray]) -> None:
    """Read every stored tile of every stored level: each equals the intact file's or fails.

    A level counts as read when none of its tiles failed; one that fails with SlideError
    is what a damaged file may do; white (or anything else) where the data is gone is
    "wrong".
    """
    failed: SlideError | None = None
    for level, info in enumerate(slide.level_info):
        if info.virtual:
            continue
        matches = [r for r in references if r.shape == slide.levels[level].shape]
        if not matches:
            raise Wrong(f"level {level} of shape {slide.levels[level].shape} is not in the file")
        expected = matches[0]
        tile_h, tile_w = info.tile_shape or info.shape
        height, width = info.shape
        for y in range(0, height, tile_h):
            for x in range(0, width, tile_w):
                try:
                    got = slide.levels[level][y : y + tile_h, x : x + tile_w].compute(
                        scheduler="sync"
                    )
                except SlideError as exc:
                    failed = failed or exc
                    continue
                if not np.array_equal(got, expected[y : y + tile_h, x : x + tile_w]):
                    white = bool((got == slide.fill_value).all())
                    raise Wrong(
                        f"level {level} tile at y={y}, x={x} reads "
                        f"{'blank' if white else 'wrong pixels'} without an error"
                    )
    if failed is not None:
        raise failed


def _stream(slide) -> None:
    """Read up to four stored tiles of level 0 through TileStream (the inference path)."""
    info = slide.level_info[0]
    tile_h, tile_w = info.tile_shape or (min(info.shape[0], 256), min(info.shape[1], 256))
    tile_h, tile_w = min(tile_h, 512), min(tile_w, 512)
    across = max(1, min(2, math.ceil(info.shape[1] / tile_w)))
    down = max(1, min(2, math.ceil(info.shape[0] / tile_h)))
    boxes = [(c * tile_w, r * tile_h, tile_w, tile_h) for r in range(down) for c in range(across)]
    with TileStream(slide, 0, np.asarray(boxes, dtype=np.int64), batch_size=2, workers=1) as stream:
        for batch in stream:
            for box, pixels in zip(batch.boxes, batch.pixels, strict=True):
                x, y, w, h = (int(v) for v in box)
                expected = slide.read_region(0, x, y, w, h)
                if not np.array_equal(pixels, expected):
                    raise Wrong(f"TileStream tile at x={x}, y={y} differs from read_region")


if __name__ == "__main__":
    main()
