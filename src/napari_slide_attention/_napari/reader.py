"""napari reader contribution: whole-slide images as one multiscale layer in µm, and
result folders (``SlideResult.save``) as their slide with every overlay of the result."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..results import is_result_directory
from ..slide.reader import (
    SLIDE_SUFFIXES,
    TIFF_SUFFIXES,
    MissingMppWarning,
    Slide,
    SlideError,
    open_slide,
)
from .layers import result_layer_data, result_scale, slide_layer_data, slide_scale

if TYPE_CHECKING:
    from ..results import SlideResult

ReaderFunction = Callable[[Any], list[tuple]]


def get_reader(path: str | list[str]) -> ReaderFunction | None:
    """Return a reader for a whole-slide image or a result folder, or None for paths this
    plugin does not take.

    Never raises for a path it does not take: plain small TIFFs (not tiled, not
    pyramidal, no vendor metadata), non-slide files and folders that are neither an
    OME-Zarr nor a result are left to other readers. A file with a slide-only extension
    (.svs, .ndpi, .ome.tif, .ome.zarr) that fails to open is taken, and its reader raises
    the SlideError, so the user sees why; so is a result folder whose arrays are damaged
    (ResultError).
    """
    paths = [path] if isinstance(path, str | Path) else list(path)
    if not paths:
        return None
    results = [is_result_directory(item) for item in paths]
    if any(results):
        if len(paths) == 1:
            return lambda _path: read_result(paths[0])
        return None  # one result at a time: each replaces the slide on show
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


def read_result(directory: str | os.PathLike) -> list[tuple]:
    """The layers of a result folder: its slide, then every overlay of the result.

    A result whose slide is not where it says (moved, or on another machine) gives its
    overlays alone, at the geometry it was made with, and a napari warning that says to
    open it from the Model panel, which asks for the slide. Every layer carries the
    result in its metadata (``"result"``, the overlays also their ``"result_role"``), so
    the session adopts the slide and the result as if the model had just run.

    Raises:
        ResultError: the folder's result cannot be read (the message names the problem).
    """
    from ..results import SlideResult

    directory = Path(directory)
    result = SlideResult.load(directory)
    slide, problem = open_result_slide(result, directory)
    layers: list[tuple] = []
    if slide is not None:
        layers.extend(slide_layer_data(slide))
        scale, units = slide_scale(slide)
    else:
        from napari.utils.notifications import show_warning

        show_warning(
            f"{directory.name}: {problem}. Showing the result's overlays alone; to see them "
            "over the slide, open the result with the Model panel's 'Open result…', which "
            "asks where the slide is."
        )
        scale, units = result_scale(result)
    overlays = result_layer_data(result, scale, units)
    tag = {
        "result": result,
        "result_path": str(directory),
        "result_roles": [role for role, _ in overlays],
    }
    for _data, kwargs, _kind in layers:
        kwargs["metadata"] = {**kwargs.get("metadata", {}), **tag}
    for role, (data, kwargs, kind) in overlays:
        metadata = {**kwargs.get("metadata", {}), **tag, "result_role": role}
        layers.append((data, {**kwargs, "metadata": metadata}, kind))
    return layers


def result_slide_path(result: SlideResult, directory: str | os.PathLike) -> Path | None:
    """The result's slide file where it is now, or None when it is not found.

    A relative slide path (a result made from the command line) is looked for from the
    working directory, then from the result folder and the folder that holds it.
    """
    path = Path(result.slide)
    candidates = [path]
    if not path.is_absolute():
        directory = Path(directory)
        candidates += [directory / path, directory.parent / path]
    return next((c for c in candidates if c.exists()), None)


def open_result_slide(
    result: SlideResult, directory: str | os.PathLike, path: str | os.PathLike | None = None
) -> tuple[Slide | None, str]:
    """Open the slide a result was made on (or ``path`` instead), at the result's mpp.

    Returns:
        The slide, or None and why not in words ("the slide ... was not found", "...
        cannot be opened: ...", "... is W x H px, the result was made on ...").
    """
    name = Path(result.slide).name
    where = Path(path) if path is not None else result_slide_path(result, directory)
    if where is None:
        return None, f"the slide {result.slide} was not found"
    mpp = result.slide_info.get("mpp")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MissingMppWarning)
            slide = open_slide(where, mpp=tuple(mpp) if mpp else None)
    except (SlideError, OSError, ValueError) as exc:
        return None, f"the slide {where} cannot be opened: {exc}"
    made_on = result.slide_info.get("dimensions")
    if made_on and tuple(made_on) != tuple(slide.dimensions):
        slide.close()
        return None, (
            f"the slide {where} is {slide.dimensions[0]} x {slide.dimensions[1]} px, but the "
            f"result was made on {name} of {made_on[0]} x {made_on[1]} px"
        )
    return slide, ""


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
