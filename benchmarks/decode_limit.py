"""The decode limit both reading benchmarks compare with (``io.py``, ``pipeline.py``).

Each stored JPEG tile decoded once, from bytes already in memory, by
``imagecodecs.jpeg8_decode`` on a thread pool of ``workers`` threads, each thread decoding
into one tile buffer again and again: it stays in the CPU's cache, and its rows start off
the 32-byte boundaries where libjpeg-turbo writes around the cache (a fresh array per tile
lands on one by chance of the allocator). Nothing is delivered anywhere: this is what
decoding alone costs.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import imagecodecs
import numpy as np

from napari_slide_attention.slide.stored_tiles import JPEG_ROW_OFFSET, offset_empty

__all__ = ["plain_decode"]


def plain_decode(
    blobs: Sequence[bytes],
    tile: int,
    workers: int,
    *,
    tables: bytes | None,
    colorspace: int | str,
    outcolorspace: int | str,
) -> dict:
    """Decode every blob once; returns wall and CPU seconds and the tiles decoded.

    Args:
        blobs: the stored tiles' bytes.
        tile: the stored tile's edge in px (square RGB tiles).
        workers: threads.
        tables, colorspace, outcolorspace: as tifffile decodes the page's tiles.
    """
    local = threading.local()

    def decode(chunk: Sequence[bytes]) -> int:
        out = getattr(local, "out", None)
        if out is None:
            out = local.out = offset_empty((tile, tile, 3), np.dtype(np.uint8), JPEG_ROW_OFFSET)
        for data in chunk:
            imagecodecs.jpeg8_decode(
                data, tables=tables, colorspace=colorspace, outcolorspace=outcolorspace, out=out
            )
        return len(chunk)

    # Few large chunks: no per-tile scheduling, the least Python a threaded decode can do.
    per = math.ceil(len(blobs) / (workers * 16))
    chunks = [blobs[i : i + per] for i in range(0, len(blobs), per)]
    with ThreadPoolExecutor(workers) as pool:
        cpu, start = time.process_time(), time.perf_counter()
        tiles = sum(pool.map(decode, chunks))
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"seconds": seconds, "cpu": cpu, "tiles": tiles}
