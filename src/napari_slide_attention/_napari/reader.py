"""napari reader contribution: whole-slide images as one multiscale layer in µm."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..slide.reader import (
    SLIDE_SUFFIXES,
    TIFF_SUFFIXES,
    MissingMppWarning,
    Slide,
    SlideError,
    open_slide,
)
from .layers import slide_layer_data

ReaderFunction = Callable[[Any], list[tuple]]


def get_reader(path: str | list[str]) -> ReaderFunction | None:
    """Return a reader for a whole-slide image, or None for paths this plugin does not take.

    Never raises for a file it does not take: plain small TIFFs (not tiled, not
    pyramidal, no vendor metadata) and non-slide files are left to other readers.
    A file with a slide-only extension (.svs, .ndpi, .ome.tif, .ome.zarr) that fails
    to open is taken, and its reader raises the SlideError, so the user sees why.
    """
    paths = [path] if isinstance(path, str | Path) else list(path)
    if not paths:
        return None
    for item in paths:
        if not _could_be_slide(Path(item)):
            return None
    opened: list[Slide | SlideError] = []
    for item in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MissingMppWarning)
                slide = open_slide(item)
        except SlideError as exc:
            if _slide_only_suffix(Path(item)):
                opened.append(exc)
                continue
            return None
        except Exception:
            return None
        if not _is_whole_slide(slide) and not _slide_only_suffix(Path(item)):
            slide.close()
            return None
        opened.append(slide)

    def read(_path: Any) -> list[tuple]:
        layers: list[tuple] = []
        for item in opened:
            if isinstance(item, SlideError):
                raise item
            layers.extend(slide_layer_data(item))
        return layers

    return read


def _slide_only_suffix(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(SLIDE_SUFFIXES)


def _could_be_slide(path: Path) -> bool:
    name = path.name.lower().rstrip("/")
    if path.is_dir():
        return (
            (path / "zarr.json").exists() or (path / ".zattrs").exists() or name.endswith(".zarr")
        )
    return name.endswith(TIFF_SUFFIXES)


def _is_whole_slide(slide: Slide) -> bool:
    """Tiled, pyramidal or from a slide vendor: what a WSI reader is for."""
    stored = [info for info in slide.level_info if not info.virtual]
    tiled = slide.tiff_page(0) is not None and slide.tiff_page(0).is_tiled
    return (
        slide.vendor != "generic-tiff" or len(stored) > 1 or tiled or max(slide.dimensions) > 8192
    )
