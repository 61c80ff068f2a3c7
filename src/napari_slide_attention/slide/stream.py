"""Stream tiles of a slide as ordered batches, decoded ahead on a thread pool.

``TileStream`` is the input side of every model: it turns a list of level-0 boxes
(e.g. a tissue tile grid) into batches of pixels read at one pyramid level.

Two ways to read a tile:

* **Fast path.** When the level is a single tiled TIFF page and a box is aligned with
  the stored tiles (its origin at that level a multiple of the tile size, its size a
  multiple of it), the stored tile bytes are read with ``os.pread`` on the stream's own
  file descriptor (no shared file position, so no lock) and decoded on the pool.
  imagecodecs releases the GIL while decoding, so the threads decode in parallel;
  JPEG tiles that fill a whole batch slot are decoded straight into the batch array,
  which starts off the 32-byte boundaries where libjpeg-turbo would write around the
  cache (see ``_JPEG_ROW_OFFSET``).
* **General path.** Everything else (unaligned boxes, OME-Zarr, virtual levels, strips,
  planar or transposed layouts) goes through ``Slide.read_region`` on the same pool.

Both paths give the same pixels as ``Slide.read_region`` (same decoders, same padding
with ``Slide.fill_value`` outside the slide).

Memory: at most ``prefetch`` batches are decoded or being decoded ahead of the batch the
consumer last received, so the pixels in flight plus the batch in the consumer's hands
come to ``(prefetch + 1) × batch bytes`` (batch bytes = ``batch_size × h × w × channels``
for uint8; see ``TileStream.batch_nbytes``). One more batch array exists: the previous
batch, which a ``for`` loop's variable keeps alive while it asks for the next one; once
the consumer has let go of it, the stream refills that array rather than allocating a
new one. So the peak is ``(prefetch + 2) × batch bytes``. Batches the consumer keeps
(e.g. in a list, or as a view or a ``torch.from_numpy`` tensor) are never refilled.
"""

from __future__ import annotations

import math
import os
import sys
import sysconfig
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import imagecodecs
import numpy as np
import tifffile

from .reader import Slide, SlideError

__all__ = ["StreamStats", "TileBatch", "TileStream", "default_workers"]

# TIFF compression code of (new-style) JPEG.
_JPEG = 7
# Stored tiles closer than this in the file are fetched by one read (the bytes between
# are read and dropped), up to this many bytes per read.
_READ_GAP = 4096
_READ_SPAN = 8 << 20
# Most boxes a worker reads between two checks for close().
_RUN = 16
# Batch arrays the consumer has dropped are refilled instead of allocating fresh ones:
# fresh pages cost page faults and cache misses (~5 % of decoding a JPEG tile). An array
# is reused only when nothing but the stream's spare list refers to it, which
# sys.getrefcount tells reliably on CPython with the GIL; elsewhere arrays are not reused.
_RECYCLE = sys.implementation.name == "cpython" and not sysconfig.get_config_var("Py_GIL_DISABLED")
_SPARES = 2
# libjpeg-turbo's x86 SIMD colour conversion writes an output row that starts on a 32-byte
# (AVX2) or 16-byte (SSE2) boundary with non-temporal stores, which go around the cache:
# decoding such a tile took ~20 % more CPU here, and the consumer then reads the batch back
# from memory. Batch arrays decoded by libjpeg-turbo therefore start this many bytes past a
# 64-byte boundary; TIFF tile widths are multiples of 16 px, so every row of every tile in
# the batch is 8 bytes off a 16-byte boundary and takes the cached stores.
_JPEG_ROW_OFFSET = 8


def _offset_empty(shape: tuple[int, ...], dtype: np.dtype, offset: int) -> np.ndarray:
    """An uninitialised array whose data starts ``offset`` bytes past a 64-byte boundary.

    The array is a view of a larger uint8 buffer (its ``base``), so that holders of views
    of it can still be counted (see ``_refcounts``).
    """
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + 64 + offset, dtype=np.uint8)
    start = (offset - raw.ctypes.data) % 64
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _refcounts(holder: list[np.ndarray], i: int) -> tuple[int, int]:
    """sys.getrefcount of ``holder[i]`` and of the buffer it views (0 when it owns its data).

    A view of a view refers to the buffer, not to the view it was cut from, so an array
    made by ``_offset_empty`` is unshared only when both counts are what they are for an
    array nobody else holds (``_UNSHARED``).
    """
    array = holder[i]
    base = array.base
    return sys.getrefcount(array), 0 if base is None else sys.getrefcount(base)


def _unshared_refcounts() -> tuple[tuple[int, int], tuple[int, int]]:
    """What ``_refcounts`` reports for unshared arrays: one owning its data, one a view."""
    owner = [np.empty(1, dtype=np.uint8)]
    view = [_offset_empty((1,), np.dtype(np.uint8), _JPEG_ROW_OFFSET)]
    return _refcounts(owner, 0), _refcounts(view, 0)


_UNSHARED = _unshared_refcounts()


class _TileFailure(Exception):
    """A tile of a run of boxes failed; carries the box's position in the run."""

    def __init__(self, position: int, error: BaseException):
        super().__init__(position, error)
        self.position = position
        self.error = error


def default_workers() -> int:
    """Number of cores this process may run on (the default thread count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class TileBatch:
    """One batch of tiles, in the order of the input box list.

    Attributes:
        pixels: (B, h, w, 3) uint8 array of the tiles at the stream's level ((B, h, w) or
            (B, h, w, C) for non-RGB slides), or whatever the stream's ``transform``
            returned for that array.
        boxes: (B, 4) int64 level-0 boxes (x, y, w, h) of the tiles.
        indices: (B,) int64 positions of the tiles in the input box list.
    """

    pixels: Any
    boxes: np.ndarray
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)


@dataclass(frozen=True)
class StreamStats:
    """How a stream's tiles are read (decided when the stream is made).

    Attributes:
        tiles: number of tiles.
        fast: tiles read from the stored TIFF tiles directly.
        general: tiles read through ``Slide.read_region``.
        fast_path: why the level cannot use the fast path, or "" when it can (then
            ``general`` counts the boxes that are not aligned with the stored tiles).
    """

    tiles: int
    fast: int
    general: int
    fast_path: str = ""


class _StoredLevel:
    """Reads and decodes the stored tiles of one tiled TIFF page."""

    def __init__(self, slide: Slide, level: int, page: tifffile.TiffPage):
        self.path = slide.path
        self.level = level
        self.fill = slide.fill_value
        self.tile_h, self.tile_w = int(page.tilelength), int(page.tilewidth)
        self.height, self.width = int(page.imagelength), int(page.imagewidth)
        self.down = math.ceil(self.height / self.tile_h)
        self.across = math.ceil(self.width / self.tile_w)
        self.offsets = [int(v) for v in page.dataoffsets]
        self.counts = [int(v) for v in page.databytecounts]
        self.squeeze = slide.levels[level].ndim == 2
        # The closure tifffile itself decodes with (what read_region ends up calling), so
        # both paths give identical pixels for every compression tifffile supports.
        self.decode = page.decode
        self.jpegtables = page.jpegtables
        self.jpegheader = getattr(page, "jpegheader", None)
        # Calling libjpeg-turbo directly lets it write into the batch array; only for the
        # plain 8-bit contiguous RGB case, with the colour spaces tifffile would use.
        self.direct_jpeg = (
            page.compression == _JPEG
            and self.jpegheader is None
            and page.bitspersample == 8
            and page.samplesperpixel == 3
            and page.planarconfig == 1
            and not page.extrasamples
        )
        self.colorspace, self.outcolorspace = tifffile.tifffile.jpeg_decode_colorspace(
            page.photometric, page.planarconfig, page.extrasamples, page.is_jfif
        )

    def read_boxes(self, out: np.ndarray, origins: np.ndarray, fd: int, file_size: int) -> None:
        """Fill ``out[k]`` with the aligned box whose level origin (y, x) is ``origins[k]``.

        Raises:
            _TileFailure: wrapping the SlideError of the first tile that fails, with the
                position of its box in ``out``.
        """
        th, tw = self.tile_h, self.tile_w
        out_h, out_w = out.shape[1:3]
        single = out_h == th and out_w == tw
        across, down = self.across, self.down
        offsets, counts, fill = self.offsets, self.counts, self.fill
        # Plan first, then read: stored tiles that lie back to back in the file (the
        # usual row-major layout) are fetched with one pread instead of one per tile.
        plan: list[tuple[np.ndarray, int, int, int, int, int, int]] = []
        for position, (ly, lx) in enumerate(origins.tolist()):
            box = out[position]
            row0, col0 = ly // th, lx // tw
            for r in range(row0, row0 + out_h // th):
                for c in range(col0, col0 + out_w // tw):
                    if single:
                        dest = box
                    else:
                        y, x = (r - row0) * th, (c - col0) * tw
                        dest = box[y : y + th, x : x + tw]
                    if not (0 <= r < down and 0 <= c < across):
                        dest[...] = fill  # outside the slide: glass
                        continue
                    index = r * across + c
                    offset, count = offsets[index], counts[index]
                    if offset == 0 or count == 0:
                        dest[...] = fill  # never written (sparse file): glass, as the reader
                        continue
                    plan.append((dest, r, c, index, offset, count, position))
        start = 0
        while start < len(plan):
            first = plan[start][4]
            end = first + plan[start][5]
            stop = start + 1
            while stop < len(plan):
                offset, count = plan[stop][4], plan[stop][5]
                if not (end <= offset <= end + _READ_GAP and offset + count - first <= _READ_SPAN):
                    break
                end = offset + count
                stop += 1
            # Read what the file has; a tile that does not fit is reported when reached,
            # after the ones before it have been decoded.
            data = _pread(fd, min(end, file_size) - first, first) if first < file_size else b""
            view = memoryview(data)
            for dest, r, c, index, offset, count, position in plan[start:stop]:
                if offset + count - first > len(data):
                    raise _TileFailure(position, self._truncated(r, c, file_size))
                try:
                    self._decode(view[offset - first : offset - first + count], dest, r, c, index)
                except SlideError as exc:
                    raise _TileFailure(position, exc) from None
            start = stop

    def _decode(self, data: memoryview, dest: np.ndarray, r: int, c: int, index: int) -> None:
        valid_h = min(self.tile_h, self.height - r * self.tile_h)
        valid_w = min(self.tile_w, self.width - c * self.tile_w)
        whole = valid_h == self.tile_h and valid_w == self.tile_w
        if self.direct_jpeg and whole and dest.flags.c_contiguous:
            try:
                imagecodecs.jpeg8_decode(
                    data,
                    tables=self.jpegtables,
                    colorspace=self.colorspace,
                    outcolorspace=self.outcolorspace,
                    out=dest,
                )
                return
            except Exception:
                pass  # tifffile's own decoder below gets the last word
        try:
            tile = self.decode(
                bytes(data), index, jpegtables=self.jpegtables, jpegheader=self.jpegheader
            )
            tile = tile[0][0]  # (depth, length, width, samples) -> (length, width, samples)
            if self.squeeze:
                tile = tile[..., 0]
            dest[:valid_h, :valid_w] = tile[:valid_h, :valid_w]
        except Exception as exc:  # codec errors come in many types
            raise SlideError(
                self.path,
                f"corrupt image data: level {self.level} tile (row {r}, column {c}) at level "
                f"pixels y={r * self.tile_h}, x={c * self.tile_w} cannot be decoded "
                f"({type(exc).__name__}: {exc})",
            ) from exc
        if not whole:
            # Edge tile: the stored tile is padded past the image; the slide is not.
            dest[valid_h:] = self.fill
            dest[:valid_h, valid_w:] = self.fill

    def _truncated(self, r: int, c: int, file_size: int) -> SlideError:
        return SlideError(
            self.path,
            f"truncated file: level {self.level} tile (row {r}, column {c}) lies beyond the "
            f"end of the file ({file_size} bytes); the file was cut short while copying or "
            "writing",
        )


if hasattr(os, "pread"):
    _pread = os.pread
else:  # Windows: no pread; serialise seek + read on the shared descriptor
    _pread_lock = threading.Lock()

    def _pread(fd: int, count: int, offset: int) -> bytes:
        with _pread_lock:
            os.lseek(fd, offset, os.SEEK_SET)
            return os.read(fd, count)


def _fast_path_problem(slide: Slide, level: int) -> str:
    """Why a level's stored tiles cannot be decoded directly ("" when they can)."""
    info = slide.level_info[level]
    if info.virtual:
        return f"level {level} is computed from the level above (virtual)"
    page = slide.tiff_page(level)
    if page is None:
        return (
            f"level {level} is not one TIFF page in (Y, X[, S]) layout "
            "(OME-Zarr, multi-page, planar or transposed)"
        )
    if not page.is_tiled:
        return f"level {level} is stored in strips, not tiles"
    if page.tiledepth != 1 or page.imagedepth != 1:
        return f"level {level} has 3-D tiles"
    if page.planarconfig != 1:
        return f"level {level} stores colour planes separately"
    if (int(page.imagelength), int(page.imagewidth)) != tuple(info.shape):
        return f"level {level}'s TIFF page is not the level's shape"
    level_array = slide.levels[level]
    channels = 1 if level_array.ndim == 2 else int(level_array.shape[2])
    if int(page.samplesperpixel) != channels or np.dtype(page.dtype) != level_array.dtype:
        return f"level {level}'s TIFF samples differ from the level's channels"
    if page.compression != 1:
        try:
            tifffile.TIFF.DECOMPRESSORS[page.compression]
        except KeyError:
            return f"level {level}'s compression {page.compression} has no decoder"
    return ""


class _Batch:
    """One batch being filled by one or more chunk tasks."""

    __slots__ = ("boxes", "errors", "future", "indices", "lock", "number", "out", "pending")

    def __init__(self, number: int, indices: np.ndarray, boxes: np.ndarray, out: np.ndarray):
        self.number = number
        self.indices = indices
        self.boxes = boxes
        self.out = out
        self.pending = 0
        self.lock = threading.Lock()
        self.errors: list[tuple[int, BaseException]] = []
        self.future: Future = Future()


class _Pass:
    """The resources of one iteration over a stream: pool, file descriptor, batches."""

    def __init__(self, workers: int, path: os.PathLike | str | None, name: str):
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self.fd = -1
        self.file_size = 0
        if path is not None:
            try:
                self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                self.file_size = os.fstat(self.fd).st_size
            except OSError as exc:
                self.pool.shutdown(wait=False)
                raise SlideError(path, f"cannot read the file: {exc.strerror or exc}") from exc
        self.pending: deque[tuple[_Batch, list[Future]]] = deque()
        self.spare: list[np.ndarray] = []
        self.closed = False
        self._close_lock = threading.Lock()

    def take_spare(self, size: int) -> np.ndarray | None:
        """A batch array the consumer has let go of, to be filled again, or None."""
        for i in range(len(self.spare)):
            if len(self.spare[i]) != size:
                continue
            unshared = _UNSHARED[0 if self.spare[i].base is None else 1]
            counts = _refcounts(self.spare, i)
            if counts[0] <= unshared[0] and counts[1] <= unshared[1]:
                return self.spare.pop(i)
        return None

    def close(self) -> None:
        """Cancel queued work, wait for running tiles to finish, release the file."""
        with self._close_lock:
            if self.closed:
                return
            self.closed = True
        self.stop.set()  # running chunks stop after their current tile
        for batch, tasks in list(self.pending):
            for task in list(tasks):
                task.cancel()
            batch.future.cancel()  # wakes a consumer waiting on it from another thread
        # cancel_futures drops what is still queued; wait=True joins the threads, so the
        # pool is gone when close() returns.
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class TileStream:
    """Iterate over tiles of a slide as ordered batches, decoded ahead on a thread pool.

    Each ``for`` loop over the stream is one pass with its own thread pool and file
    descriptor; a finished or closed stream can be iterated again (a fresh pass, which
    reads everything again), but two passes at once raise RuntimeError. Leaving a loop
    early (``break``, an exception), calling ``close()`` or leaving a ``with`` block
    cancels the queued work and joins the pool's threads before returning. An error
    reading a tile (SlideError naming the file, level and tile) or raised by
    ``transform`` is raised by the consumer's ``next()`` for the batch it belongs to,
    after all earlier batches have been delivered.

    Batch arrays are refilled for later batches once nothing refers to them any more, so
    keep the array (or a view or tensor of it), not a raw pointer into it.

    Args:
        slide: an opened slide.
        level: pyramid level to read at.
        boxes: (n, 4) level-0 boxes (x, y, w, h), all of the same size, as an int array
            or a list of 4-tuples.
        batch_size: tiles per batch (the last batch may be smaller).
        workers: decoding threads; None = the cores this process may use.
        prefetch: batches decoded ahead of the batch the consumer holds (0 = decode on
            demand). Pixel memory peaks at ``(prefetch + 2) × batch_nbytes`` (see the
            module's notes).
        tile_size: expected (height, width) of a tile at ``level`` (or one int), checked
            against the boxes so that a grid made for another level fails loudly; None
            to take it from the boxes.
        transform: called on each batch's pixel array in the worker thread that completes
            the batch (e.g. normalisation), so that it overlaps with the consumer; its
            result becomes ``TileBatch.pixels``.

    Raises:
        ValueError: bad level, box shapes or sizes, or settings.

    Example:
        >>> with TileStream(slide, level=1, boxes=grid, batch_size=64) as stream:
        ...     for batch in stream:
        ...         features.append(model(batch.pixels))
    """

    def __init__(
        self,
        slide: Slide,
        level: int,
        boxes: np.ndarray | Sequence[Sequence[int]],
        *,
        batch_size: int = 32,
        workers: int | None = None,
        prefetch: int = 2,
        tile_size: int | tuple[int, int] | None = None,
        transform: Callable[[np.ndarray], Any] | None = None,
    ):
        if not isinstance(level, int | np.integer) or not 0 <= level < slide.level_count:
            raise ValueError(f"level {level} does not exist (the slide has {slide.level_count})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be 0 or more, got {prefetch}")
        workers = default_workers() if workers is None else int(workers)
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.slide = slide
        self.level = int(level)
        self.batch_size = int(batch_size)
        self.prefetch = int(prefetch)
        self.workers = workers
        self.transform = transform
        self.boxes = _as_boxes(boxes)
        self._lock = threading.Lock()
        self._pass: _Pass | None = None

        n = len(self.boxes)
        info = slide.level_info[self.level]
        height, width = info.shape
        # The same arithmetic as Slide.read_region, so both paths cut the same pixels.
        sy = slide.level_info[0].shape[0] / height
        sx = slide.level_info[0].shape[1] / width
        if n:
            sizes = np.unique(self.boxes[:, 2:], axis=0)
            if len(sizes) > 1:
                raise ValueError(
                    f"all boxes must have the same size; got {len(sizes)} sizes "
                    f"(w, h) such as {tuple(sizes[0])} and {tuple(sizes[1])}"
                )
            w0, h0 = (int(v) for v in sizes[0])
            if w0 <= 0 or h0 <= 0:
                raise ValueError(f"box size must be positive, got w={w0}, h={h0}")
            shape = (max(1, round(h0 / sy)), max(1, round(w0 / sx)))
        elif tile_size is not None:
            shape = _pair(tile_size)
        else:
            shape = (0, 0)
        if tile_size is not None and _pair(tile_size) != shape:
            raise ValueError(
                f"the boxes are {shape[0]}x{shape[1]} (h x w) pixels at level {self.level}, "
                f"not the expected tile_size {_pair(tile_size)}"
            )
        self.tile_shape: tuple[int, int] = shape
        self.pixel_shape: tuple[int, ...] = (*shape, *slide.levels[self.level].shape[2:])
        self.dtype = np.dtype(slide.dtype)
        self._origins = np.stack(
            [
                np.floor(self.boxes[:, 1] / sy).astype(np.int64),
                np.floor(self.boxes[:, 0] / sx).astype(np.int64),
            ],
            axis=1,
        )

        problem = _fast_path_problem(slide, self.level) if n else ""
        self._stored: _StoredLevel | None = None
        self._fast = np.zeros(n, dtype=bool)
        if not problem and n:
            stored = _StoredLevel(slide, self.level, slide.tiff_page(self.level))
            if shape[0] % stored.tile_h or shape[1] % stored.tile_w:
                problem = (
                    f"the tiles ({shape[0]}x{shape[1]}) are not a multiple of the stored "
                    f"tiles ({stored.tile_h}x{stored.tile_w})"
                )
            else:
                self._stored = stored
                self._fast = (self._origins[:, 0] % stored.tile_h == 0) & (
                    self._origins[:, 1] % stored.tile_w == 0
                )
        n_fast = int(self._fast.sum())
        self.stats = StreamStats(tiles=n, fast=n_fast, general=n - n_fast, fast_path=problem)

    # -- sizes -----------------------------------------------------------------------
    @property
    def n_tiles(self) -> int:
        """Number of tiles in the stream."""
        return len(self.boxes)

    def __len__(self) -> int:
        """Number of batches."""
        return math.ceil(self.n_tiles / self.batch_size)

    @property
    def batch_nbytes(self) -> int:
        """Bytes of one full batch of pixels (before ``transform``)."""
        return self.batch_size * math.prod(self.pixel_shape) * self.dtype.itemsize

    def __repr__(self) -> str:
        return (
            f"TileStream({self.slide.path}, level={self.level}, tiles={self.n_tiles}, "
            f"batches={len(self)}, tile_shape={self.tile_shape}, workers={self.workers}, "
            f"prefetch={self.prefetch}, fast={self.stats.fast}, general={self.stats.general})"
        )

    # -- iteration -------------------------------------------------------------------
    def __iter__(self) -> Iterator[TileBatch]:
        return self._iterate()

    def close(self) -> None:
        """Stop the pass in progress, if any: cancel queued work and join the threads."""
        with self._lock:
            current, self._pass = self._pass, None
        if current is not None:
            current.close()

    def __enter__(self) -> TileStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _iterate(self) -> Iterator[TileBatch]:
        n_batches = len(self)
        if n_batches == 0:
            return
        with self._lock:
            if self._pass is not None and not self._pass.closed:
                raise RuntimeError(
                    "this TileStream is already being iterated; finish or close() that "
                    "loop first, or make a second TileStream"
                )
            path = self.slide.path if self.stats.fast else None
            current = _Pass(self.workers, path, f"tilestream-{id(self):x}")
            self._pass = current
        ahead = self.prefetch
        try:
            submitted = 0
            for number in range(n_batches):
                # The consumer asking for batch `number` is done with `number - 1`, so up
                # to `number - 1 + prefetch` may be in flight while it waits...
                while submitted < n_batches and submitted <= max(number, number - 1 + ahead):
                    if not self._submit(current, submitted):
                        return  # closed by close() or a with block
                    submitted += 1
                try:
                    batch, _ = current.pending[0]
                except IndexError:  # only close() empties the queue
                    return
                try:
                    result = batch.future.result()
                except CancelledError:
                    if current.closed:  # close() from elsewhere while we waited
                        return
                    raise
                current.pending.popleft()
                raw = batch.out
                del batch
                # ...and once it has `number`, `prefetch` batches may be ahead of it.
                while submitted < n_batches and submitted <= number + ahead:
                    if not self._submit(current, submitted):
                        return
                    submitted += 1
                yield result
                del result  # do not keep the consumer's last batch alive
                current.spare.append(raw)
                del raw
                if len(current.spare) > _SPARES:
                    del current.spare[0]
        finally:
            current.close()
            with self._lock:
                if self._pass is current:
                    self._pass = None

    def _submit(self, current: _Pass, number: int) -> bool:
        """Queue the reading of one batch; False when the pass has been closed."""
        if current.closed:
            return False
        lo = number * self.batch_size
        hi = min(lo + self.batch_size, self.n_tiles)
        indices = np.arange(lo, hi, dtype=np.int64)
        out = current.take_spare(hi - lo) if _RECYCLE else None
        if out is None:
            shape = (hi - lo, *self.pixel_shape)
            if self._stored is not None and self._stored.direct_jpeg:
                out = _offset_empty(shape, self.dtype, _JPEG_ROW_OFFSET)
            else:
                out = np.empty(shape, dtype=self.dtype)
        batch = _Batch(number, indices, self.boxes[lo:hi], out)
        # Split a batch across the threads so that even prefetch=1 keeps them all busy;
        # chunks of several tiles keep the per-task overhead small next to decoding.
        size = hi - lo
        chunks = min(size, self.workers)
        bounds = [size * i // chunks for i in range(chunks + 1)]
        batch.pending = chunks
        tasks: list[Future] = []
        current.pending.append((batch, tasks))
        try:
            for i in range(chunks):
                tasks.append(
                    current.pool.submit(self._fill, current, batch, bounds[i], bounds[i + 1])
                )
        except RuntimeError:  # the pool was shut down by close() from another thread
            if current.closed:
                return False
            raise
        return True

    def _fill(self, current: _Pass, batch: _Batch, start: int, stop: int) -> None:
        """Worker task: read tiles start:stop of a batch into its array."""
        slide, level, stored = self.slide, self.level, self._stored
        fast = self._fast[batch.indices]
        j = start
        try:
            while j < stop:
                if current.stop.is_set() or batch.errors:
                    break  # closed, or another chunk of this batch already failed
                if fast[j]:
                    # A run of fast-path boxes goes to the stored level in one call so
                    # that neighbouring tiles share reads; runs stay short so that a
                    # close() is noticed quickly.
                    k = j + 1
                    while k < stop and k - j < _RUN and fast[k]:
                        k += 1
                    origins = self._origins[batch.indices[j:k]]
                    try:
                        stored.read_boxes(batch.out[j:k], origins, current.fd, current.file_size)
                    except _TileFailure as failure:
                        j += failure.position
                        raise failure.error from None
                    j = k
                else:
                    x, y, w, h = batch.boxes[j].tolist()
                    batch.out[j] = slide.read_region(level, x, y, w, h)
                    j += 1
        except BaseException as exc:
            with batch.lock:
                batch.errors.append((j, exc))
        with batch.lock:
            batch.pending -= 1
            last = batch.pending == 0
        if last:
            self._finish(current, batch)

    def _finish(self, current: _Pass, batch: _Batch) -> None:
        """Runs in the worker that completes a batch: transform it and hand it over."""
        if batch.future.cancelled() or current.stop.is_set():
            batch.future.cancel()
            return
        if batch.errors:
            # Several tiles may fail; report the first in the batch, whichever thread
            # got there first, so the error does not depend on scheduling.
            batch.future.set_exception(min(batch.errors, key=lambda e: e[0])[1])
            return
        try:
            pixels = batch.out if self.transform is None else self.transform(batch.out)
        except BaseException as exc:
            batch.future.set_exception(exc)
            return
        batch.future.set_result(TileBatch(pixels=pixels, boxes=batch.boxes, indices=batch.indices))


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int | np.integer):
        return (int(size), int(size))
    h, w = size
    return (int(h), int(w))


def _as_boxes(boxes: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
    array = np.asarray(boxes)
    if array.size == 0:
        return np.zeros((0, 4), dtype=np.int64)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"boxes must be an (n, 4) array of (x, y, w, h), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        rounded = np.round(array)
        if not np.array_equal(rounded, array):
            raise ValueError("boxes must be whole level-0 pixels (integers)")
        array = rounded
    return np.ascontiguousarray(array, dtype=np.int64)
