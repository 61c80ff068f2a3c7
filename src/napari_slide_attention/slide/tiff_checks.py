"""Checks of a TIFF level's directory against the file, made before anything is built on it.

tifffile reads what a directory says: a tile whose offset or byte count is 0 is "not
stored" and reads as the fill value (white glass on RGB slides), a missing offsets tag
gives no tiles at all, and sizes are taken as written. So a file cut short inside its
tile offsets, or a bit flip in a size tag, would read as blank glass or make the reader
build graphs and buffers for a 10⁹-pixel image of a 1 kB file. ``check_level`` refuses
such levels with a ``SlideError`` that says what is wrong, before any array exists:

* sizes: every dimension, tile and strip at least 1; a decoder for the compression; a
  sample type numpy knows; a known photometric interpretation;
* bounds: a level has no more tiles or strips than the file can list offsets for
  (``_MIN_ENTRY_BYTES`` each; sparse tiles count, so a mostly empty 200,000 px slide of
  13 MB opens), and one decoded tile or strip takes at most the file's size plus
  ``_MAX_SEGMENT_EXTRA`` bytes, so a file cannot make the reader allocate much more than
  itself;
* offsets: one offset and one byte count per tile or strip (no fewer, no more), none
  pointing into the file header, and some tile stored. Tiles with byte count 0 are
  sparse (never written; GDAL and tifffile write blank tiles so) and read as the fill
  value; they are counted in the notes. Tiles that run past the end of the file are
  noted here and refused when read (``levels.CheckedLevel``, ``stored_tiles``), so what
  lies before a cut still reads; in levels of several pages or colour planes, which
  have no per-tile check on read, they are refused here.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import tifffile

from .reader import SlideError

# Bytes the file holds for each tile or strip at the least: its offset and byte count,
# as SHORTs (2 bytes each) in the smallest of files.
_MIN_ENTRY_BYTES = 4
# A decoded tile or strip may exceed the file's own size by this much (compressed data).
_MAX_SEGMENT_EXTRA = 256 << 20
# Image planes (pages) one level may span: channels of a multiplexed scan, not more.
_MAX_PAGES = 4096


def header_bytes(tif: tifffile.TiffFile) -> int:
    """Bytes of the file header, where no tile can start."""
    return 16 if tif.is_bigtiff else 8


def check_level(
    path: Path,
    index: int,
    level: tifffile.TiffPageSeries,
    file_size: int,
    header: int,
) -> list[str]:
    """Check one stored level's sizes and tile offsets; return notes on what reads oddly.

    Raises:
        SlideError: the directory cannot describe this file (the message says why).
    """
    name = f"level {index}"
    page = level.keyframe
    _check_sizes(path, name, page)
    dtype = np.dtype(page.dtype)
    shape = tuple(int(v) for v in level.shape)
    if any(v < 1 for v in shape):
        raise SlideError(path, f"damaged TIFF: {name} has shape {shape}")
    # Every tile or strip the size tags give needs an offset and a byte count in the file,
    # whether stored or sparse: a size no file of this size can list is a damaged tag.
    # (A bound on pixels per byte would refuse real sparse slides: a 200,000 px square
    # of glass with three tissue pieces is 13 MB, 3,000 pixels a byte.)
    segments = math.prod(int(v) for v in page.chunked)
    if segments * _MIN_ENTRY_BYTES > file_size:
        word = "tiles" if page.is_tiled else "strips"
        raise SlideError(
            path,
            f"damaged TIFF: {name} claims {_size_text(page)} in {_count(segments)} {word}, "
            f"more than a file of {file_size} bytes can list; its size tags are wrong",
        )
    segment_bytes = math.prod(int(v) for v in page.chunks) * dtype.itemsize
    if segment_bytes > file_size + _MAX_SEGMENT_EXTRA:
        kind = "tile" if page.is_tiled else "strip"
        raise SlideError(
            path,
            f"damaged or unsupported TIFF: one {kind} of {name} decodes to "
            f"{segment_bytes / 2**20:.0f} MiB, more than the file's {file_size} bytes allow; "
            "re-save the slide with tiles of a usual size (e.g. 256 x 256)",
        )
    return _check_offsets(path, name, level, page, file_size, header)


def _check_sizes(path: Path, name: str, page: tifffile.TiffPage) -> None:
    sizes = {
        "width": page.imagewidth,
        "height": page.imagelength,
        "depth": page.imagedepth,
        "samples per pixel": page.samplesperpixel,
    }
    if page.is_tiled:
        sizes |= {
            "tile width": page.tilewidth,
            "tile height": page.tilelength,
            "tile depth": page.tiledepth,
        }
    else:
        # tifffile reads a page with a tile width or height of 0 as striped: name the tag.
        for code, what in ((322, "tile width"), (323, "tile height")):
            tag = page.tags.get(code)
            if tag is not None:
                sizes[what] = tag.value
        sizes["rows per strip"] = page.rowsperstrip
    for what, value in sizes.items():
        if not isinstance(value, int | np.integer) or value < 1:
            raise SlideError(path, f"damaged TIFF: {name} has {what} {value!r}")
    if page.dtype is None:
        raise SlideError(
            path,
            f"unsupported TIFF: {name} has {page.bitspersample!r} bits per sample of sample "
            f"format {int(page.sampleformat)}, which no reader here decodes",
        )
    if not isinstance(page.photometric, tifffile.PHOTOMETRIC):
        raise SlideError(
            path,
            f"unsupported TIFF: {name} has photometric interpretation {page.photometric!r}, "
            "which no reader here knows",
        )
    if page.compression not in tifffile.TIFF.DECOMPRESSORS:
        raise SlideError(
            path,
            f"unsupported TIFF: {name} uses compression {int(page.compression)}, for which "
            "no decoder is installed",
        )


def _check_offsets(
    path: Path,
    name: str,
    level: tifffile.TiffPageSeries,
    keyframe: tifffile.TiffPage,
    file_size: int,
    header: int,
) -> list[str]:
    """Check the tile offsets and byte counts of every page of a level."""
    expected = math.prod(int(v) for v in keyframe.chunked)
    word = "tile" if keyframe.is_tiled else "strip"
    count = len(level)
    if count > _MAX_PAGES:
        raise SlideError(path, f"damaged or unsupported TIFF: {name} spans {count} image planes")
    if level.is_truncated:
        # One page describes contiguous data for all (tifffile's shaped/ImageJ files).
        start = level.dataoffset
        nbytes = math.prod(int(v) for v in level.get_shape(False)) * np.dtype(level.dtype).itemsize
        if start is None or start < header or start + nbytes > file_size:
            raise SlideError(
                path,
                f"truncated or damaged TIFF: the {nbytes} bytes of {name} at offset {start} "
                f"do not fit in the file ({file_size} bytes)",
            )
        return []
    per_tile_check = count == 1 and keyframe.planarconfig == 1
    sparse = beyond = 0
    for number in range(count):
        try:
            page = level[number]
        except Exception as exc:
            page, problem = None, f" ({exc})"
        else:
            problem = ""
        where = name if count == 1 else f"{name} plane {number}"
        if page is None:
            raise SlideError(path, f"truncated or damaged TIFF: {where} cannot be read{problem}")
        if isinstance(page, tifffile.TiffPage):
            # Tile or strip tags: NDPI stores tiles (its JPEG restart markers) as a strip.
            missing = [
                what
                for what, codes in (("offsets", (273, 324)), ("byte counts", (279, 325)))
                if not any(code in page.tags for code in codes)
            ]
            if missing:
                what = missing[0]
                raise SlideError(
                    path,
                    f"truncated or damaged TIFF: the directory of {where} has no {word} "
                    f"{what} (the file was cut short or overwritten there)",
                )
        offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        counts = np.asarray(page.databytecounts, dtype=np.int64)
        if len(offsets) != expected or len(counts) != expected:
            # Fewer: cut short (tifffile would read the rest as blank); more: the size
            # tags no longer match the directory (tiles would land in the wrong places).
            raise SlideError(
                path,
                f"truncated or damaged TIFF: {where} needs {expected} {word}s but its directory "
                f"lists {len(offsets)} offsets and {len(counts)} byte counts",
            )
        stored = counts > 0
        bad = stored & (offsets < header)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise SlideError(
                path,
                f"damaged TIFF: {where} {word} {first} has {int(counts[first])} bytes at offset "
                f"{int(offsets[first])}, inside the file header; its directory is corrupt",
            )
        if (counts < 0).any():
            raise SlideError(path, f"damaged TIFF: {where} has negative {word} byte counts")
        sparse += int(np.count_nonzero(~stored))
        # Multi-file OME-TIFF: a page's tiles lie in the file that holds the page.
        size = _own_file_size(page, file_size)
        past = stored & (offsets + counts > size)
        beyond += int(np.count_nonzero(past))
        if past.any() and not per_tile_check:
            raise SlideError(
                path,
                f"truncated file: {int(np.count_nonzero(past))} {word}s of {where} lie beyond "
                f"the end of the file ({size} bytes); the file was cut short while "
                "copying or writing",
            )
    total = expected * count
    if sparse == total:
        raise SlideError(
            path,
            f"damaged TIFF: {name} stores no image data (every one of its {total} {word}s has "
            "byte count 0)",
        )
    notes = []
    if sparse:
        notes.append(f"{sparse} of {total} {word}s of {name} are not stored and read as blank")
    if beyond:
        notes.append(
            f"truncated file: {beyond} of {total} {word}s of {name} lie beyond the end of the "
            f"file ({file_size} bytes); reading them fails"
        )
    return notes


def _own_file_size(page, default: int) -> int:
    """The size of the file a page is stored in (another file's, in multi-file series)."""
    try:
        return int(page.parent.filehandle.size)
    except Exception:
        return default


def _size_text(page: tifffile.TiffPage) -> str:
    return f"{page.imagewidth} x {page.imagelength} px"


def _count(value: int) -> str:
    for unit, scale in (("billion", 1e9), ("million", 1e6)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return str(value)
