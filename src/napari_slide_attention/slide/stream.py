"""Stream tiles of a slide as ordered batches, decoded ahead on a thread pool.

``TileStream`` is the input side of every model: it turns a list of level-0 boxes
(e.g. a tissue tile grid) into batches of pixels read at one pyramid level.

Three ways to read a tile (``StreamStats`` counts them):

* **Direct.** When the level is a single tiled TIFF page and a box is aligned with the
  stored tiles (its origin at that level a multiple of the tile size, its size a multiple
  of it) and no other box needs its stored tiles, the stored tile bytes are read with
  ``os.pread`` on the stream's own file descriptor (no shared file position, so no lock)
  and decoded on the pool straight into the batch array. imagecodecs releases the GIL
  while decoding, so the threads decode in parallel; JPEG batch arrays start off the
  32-byte boundaries where libjpeg-turbo would write around the cache
  (``stored_tiles.JPEG_ROW_OFFSET``).
* **Assembled.** Every other box on such a level (any size, any alignment, past the
  slide's edge): its stored tiles are decoded on the pool into a cache shared by the
  pass, each once, and the parts the box covers are copied into the batch. The boxes
  that need each stored tile are counted when the stream is made; a decoded tile is kept
  until the last of them has taken its part, so the tiles neighbouring boxes share (also
  across batches) are not decoded again. See ``slide/stored_tiles.py``.
* **Banded.** Levels without stored tiles to decode (strip TIFFs, OME-Zarr, virtual
  levels, planar or transposed layouts): consecutive boxes on the same rows, close
  together (a grid row, in row-major order), form a band that one ``Slide.read_region``
  call reads on the pool; the boxes are cut from it, and it is dropped once the last of
  them is.

All give the same pixels as ``Slide.read_region`` (same decoders, same padding with
``Slide.fill_value`` outside the slide, never-written tiles as fill).

Memory:

* Batches: at most ``prefetch`` batches are decoded or being decoded ahead of the batch
  the consumer last received, so the pixels in flight plus the batch in the consumer's
  hands come to ``(prefetch + 1) × batch bytes`` (batch bytes = ``batch_size × h × w ×
  channels`` for uint8; see ``TileStream.batch_nbytes``). One more batch array exists:
  the previous batch, which a ``for`` loop's variable keeps alive while it asks for the
  next one; once the consumer has let go of it, the stream refills that array rather
  than allocating a new one. So the peak is ``(prefetch + 2) × batch bytes``. Batches the
  consumer keeps (e.g. in a list, or as a view or a ``torch.from_numpy`` tensor) are
  never refilled.
* Decoded stored tiles (assembled boxes): a tile is held from its first box to its
  last. For a grid read in row-major order that is about one row of stored tiles across
  the grid plus the tiles of the boxes in flight (a 32768 px wide grid of 492 px boxes
  over 256 px RGB tiles: 128 tiles of 192 KiB, 24 MiB). ``TileStream.cache_nbytes`` gives
  the figure for a stream's boxes. The cache never keeps more than ``cache_bytes``
  (default 256 MiB) for later boxes: past that it drops the tiles needed last, which are
  decoded again when their boxes come (only orders that jump about, such as shuffled
  boxes, get there). On top: the tiles of the runs of boxes being assembled (each
  thread takes up to ``_RUN`` = 16 boxes at a time) and up to ``32 × workers + 16``
  spare tile buffers (6 MiB per thread for 256 px RGB tiles) that save decoding into
  fresh memory.
* Bands (banded boxes): one band is at most ``_BAND_BYTES`` (16 MiB) or one box wide,
  and is dropped as soon as its last box is cut, so the bands held are those of the
  boxes in flight; ``TileStream.cache_nbytes`` gives the peak for a stream's boxes.
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

import numpy as np

from . import stored_tiles
from .reader import Slide, SlideError
from .stored_tiles import (
    SharedPieces,
    StoredLevel,
    TileFailure,
    TilePlan,
    offset_empty,
    spare_tiles,
    stored_tiles_problem,
)

__all__ = ["StreamStats", "TileBatch", "TileStream", "default_workers"]

# Most boxes a worker reads between two checks for close().
_RUN = 16
# Batch arrays the consumer has dropped are refilled instead of allocating fresh ones:
# fresh pages cost page faults and cache misses (~5 % of decoding a JPEG tile). An array
# is reused only when nothing but the stream's spare list refers to it, which
# sys.getrefcount tells reliably on CPython with the GIL; elsewhere arrays are not reused.
_RECYCLE = sys.implementation.name == "cpython" and not sysconfig.get_config_var("Py_GIL_DISABLED")
_SPARES = 2
# Decoded stored tiles kept for later boxes, at most (TileStream's cache_bytes).
_CACHE_BYTES = 256 << 20
# Widest band read at once (bytes of pixels), unless one box is wider; boxes further
# apart than one box width are not read as one band.
_BAND_BYTES = 16 << 20
# Ways a box is read (TileStream._route).
_DIRECT, _ASSEMBLED, _BANDED = 0, 1, 2


def _refcounts(holder: list[np.ndarray], i: int) -> tuple[int, int]:
    """sys.getrefcount of ``holder[i]`` and of the buffer it views (0 when it owns its data).

    A view of a view refers to the buffer, not to the view it was cut from, so an array
    made by ``stored_tiles.offset_empty`` is unshared only when both counts are what they
    are for an array nobody else holds (``_UNSHARED``).
    """
    array = holder[i]
    base = array.base
    return sys.getrefcount(array), 0 if base is None else sys.getrefcount(base)


def _unshared_refcounts() -> tuple[tuple[int, int], tuple[int, int]]:
    """What ``_refcounts`` reports for unshared arrays: one owning its data, one a view."""
    owner = [np.empty(1, dtype=np.uint8)]
    view = [offset_empty((1,), np.dtype(np.uint8), stored_tiles.JPEG_ROW_OFFSET)]
    return _refcounts(owner, 0), _refcounts(view, 0)


_UNSHARED = _unshared_refcounts()


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
    """Which way each of a stream's tiles is read (decided when the stream is made).

    Attributes:
        tiles: number of tiles.
        direct: tiles whose stored tiles are decoded straight into the batch (aligned
            with the stored tiles, a whole number of them, none shared with another box).
        assembled: tiles copied from stored tiles decoded once per pass into the cache.
        banded: tiles cut from bands read with ``Slide.read_region`` (levels without
            stored tiles to decode).
        stored_tiles: distinct stored tiles (with data) the boxes need: what a pass
            decodes, each once while the cache holds the shared ones (0 when banded).
        bands: ``Slide.read_region`` calls a pass makes (0 unless banded).
        fast_path: why the level has no stored tiles to decode, or "" when it has.
    """

    tiles: int
    direct: int = 0
    assembled: int = 0
    banded: int = 0
    stored_tiles: int = 0
    bands: int = 0
    fast_path: str = ""

    @property
    def fast(self) -> int:
        """Tiles read from the stored TIFF tiles (direct or assembled)."""
        return self.direct + self.assembled

    @property
    def general(self) -> int:
        """Tiles read through ``Slide.read_region`` (banded)."""
        return self.banded


@dataclass(frozen=True)
class _BandPlan:
    """Bands of boxes read by one ``Slide.read_region`` each (made by ``_plan_bands``).

    Attributes:
        of_box: (n,) band of each box; a band's boxes follow each other in the list.
        first: (bands,) position of each band's first box.
        x0: (bands,) level column where each band starts.
        width: (bands,) level columns of each band.
        uses: band -> number of its boxes.
        peak_nbytes: most bytes of bands held at once when the boxes are read in order.
    """

    of_box: np.ndarray
    first: np.ndarray
    x0: np.ndarray
    width: np.ndarray
    uses: dict[int, int]
    peak_nbytes: int


def _plan_bands(
    origins: np.ndarray, shape: tuple[int, int], pixel_nbytes: int, window: int
) -> _BandPlan:
    """Group consecutive boxes on the same level rows into bands of at most _BAND_BYTES.

    Args:
        origins: (n, 2) level origins (y, x) of the boxes.
        shape: (h, w) of a box at the level.
        pixel_nbytes: bytes of one pixel.
        window: boxes that may be in flight at once (for ``peak_nbytes``).
    """
    n = len(origins)
    h, w = shape
    ys, xs = origins[:, 0], origins[:, 1]
    step = np.diff(xs)
    # A band goes on while the next box is on the same rows, to the right, at most one
    # box width away (reading a wider gap would cost more than the seam it saves).
    run = np.ones(n, dtype=bool)
    run[1:] = (ys[1:] != ys[:-1]) | (step <= 0) | (step > 2 * w)
    start_x = xs[np.flatnonzero(run)][np.cumsum(run) - 1]
    span = max(w, _BAND_BYTES // max(1, h * pixel_nbytes))
    part = (xs - start_x) // span
    new = run.copy()
    new[1:] |= part[1:] != part[:-1]
    of_box = np.cumsum(new) - 1
    first = np.flatnonzero(new)
    last = np.append(first[1:], n) - 1
    width = xs[last] + w - xs[first]
    live = np.zeros(n + 2, dtype=np.int64)
    np.add.at(live, np.maximum(first - window, 0), width * h * pixel_nbytes)
    np.add.at(live, last + 1, -width * h * pixel_nbytes)
    return _BandPlan(
        of_box=of_box,
        first=first,
        x0=xs[first],
        width=width,
        uses=dict(enumerate((last - first + 1).tolist())),
        peak_nbytes=int(np.cumsum(live).max()) if n else 0,
    )


def _level0_width(columns: int, scale: float) -> int:
    """A level-0 width that ``Slide.read_region`` reads as ``columns`` level columns."""
    guess = round(columns * scale)
    for width in (guess, guess - 1, guess + 1, guess - 2, guess + 2):
        if width > 0 and max(1, round(width / scale)) == columns:
            return width
    return math.ceil((columns + 1) * scale)  # a column too many; cut off below


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
    """The resources of one iteration over a stream: pool, file descriptor, batches, caches."""

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
        # Decoded stored tiles (assembled boxes) and bands (banded boxes) of this pass.
        self.tiles: SharedPieces | None = None
        self.bands: SharedPieces | None = None
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
        cache_bytes: most bytes of decoded stored tiles kept for later boxes (None: 256
            MiB). Boxes in grid order need far less (``cache_nbytes``); below that, shared
            tiles are decoded more than once.

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
        cache_bytes: int | None = None,
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
        cache_bytes = _CACHE_BYTES if cache_bytes is None else int(cache_bytes)
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be 0 or more, got {cache_bytes}")
        self.slide = slide
        self.level = int(level)
        self.batch_size = int(batch_size)
        self.prefetch = int(prefetch)
        self.workers = workers
        self.transform = transform
        self.cache_bytes = cache_bytes
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
        self._scale = (sy, sx)
        self._origins = np.stack(
            [
                np.floor(self.boxes[:, 1] / sy).astype(np.int64),
                np.floor(self.boxes[:, 0] / sx).astype(np.int64),
            ],
            axis=1,
        )

        # Decide how each box is read. The caches hold what the boxes in progress at once
        # need (for cache_nbytes): one run of a batch with one thread, else the chunks of
        # up to two batches.
        window = min(self.batch_size, _RUN) if self.workers == 1 else 2 * self.batch_size
        problem = stored_tiles_problem(slide, self.level) if n else ""
        self._stored: StoredLevel | None = None
        self._tile_plan: TilePlan | None = None
        self._bands: _BandPlan | None = None
        self._route = np.full(n, _BANDED, dtype=np.int8)
        if n and not problem:
            self._stored = StoredLevel(slide, self.level, slide.tiff_page(self.level))
            self._tile_plan = self._stored.plan(self._origins, shape, window)
            self._route[:] = np.where(self._tile_plan.direct, _DIRECT, _ASSEMBLED)
        elif n:
            pixel_nbytes = math.prod(self.pixel_shape[2:]) * self.dtype.itemsize
            self._bands = _plan_bands(self._origins, shape, pixel_nbytes, window)
        counts = np.bincount(self._route, minlength=3)
        self.stats = StreamStats(
            tiles=n,
            direct=int(counts[_DIRECT]),
            assembled=int(counts[_ASSEMBLED]),
            banded=int(counts[_BANDED]),
            stored_tiles=self._tile_plan.needed if self._tile_plan else 0,
            bands=len(self._bands.first) if self._bands else 0,
            fast_path=problem,
        )

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

    @property
    def cache_nbytes(self) -> int:
        """Most bytes of decoded stored tiles or bands a pass holds for these boxes.

        Counts what the boxes in their order need, up to ``cache_bytes`` for stored
        tiles; see the module's notes for what comes on top.
        """
        if self._tile_plan is not None:
            needed = self._tile_plan.peak_tiles * self._stored.tile_nbytes
            return min(needed, self.cache_bytes)
        return self._bands.peak_nbytes if self._bands is not None else 0

    def __repr__(self) -> str:
        return (
            f"TileStream({self.slide.path}, level={self.level}, tiles={self.n_tiles}, "
            f"batches={len(self)}, tile_shape={self.tile_shape}, workers={self.workers}, "
            f"prefetch={self.prefetch}, direct={self.stats.direct}, "
            f"assembled={self.stats.assembled}, banded={self.stats.banded})"
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
            path = self.slide.path if self._stored is not None else None
            current = _Pass(self.workers, path, f"tilestream-{id(self):x}")
            if self._tile_plan is not None:
                current.tiles = SharedPieces(
                    self._tile_plan.uses,
                    self.cache_bytes,
                    last=self._tile_plan.last,
                    new_buffer=self._stored.new_tile,
                    spares=spare_tiles(self.workers),
                )
            if self._bands is not None:
                current.bands = SharedPieces(self._bands.uses, math.inf)
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
                out = offset_empty(shape, self.dtype, stored_tiles.JPEG_ROW_OFFSET)
            else:
                out = np.empty(shape, dtype=self.dtype)
        batch = _Batch(number, indices, self.boxes[lo:hi], out)
        # Split a batch across the threads so that even prefetch=1 keeps them all busy;
        # chunks of several tiles keep the per-task overhead small next to decoding.
        size = hi - lo
        chunks = min(size, self.workers)
        bounds = [size * i // chunks for i in range(chunks + 1)]
        if self._bands is not None:
            bounds = _band_bounds(bounds, self._bands.of_box[lo:hi])
            chunks = len(bounds) - 1
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
        stored = self._stored
        route = self._route[batch.indices]
        j = start
        try:
            while j < stop:
                if current.stop.is_set() or batch.errors:
                    break  # closed, or another chunk of this batch already failed
                kind = route[j]
                if kind != _BANDED:
                    # A run of boxes goes to the stored level in one call so that
                    # neighbouring boxes share reads and tiles; runs stay short so that a
                    # close() is noticed quickly.
                    k = j + 1
                    while k < stop and k - j < _RUN and route[k] == kind:
                        k += 1
                    out, origins = batch.out[j:k], self._origins[batch.indices[j:k]]
                    try:
                        if kind == _DIRECT:
                            stored.read_boxes(out, origins, current.fd, current.file_size)
                        else:
                            stored.assemble_boxes(
                                out, origins, current.fd, current.file_size, current.tiles
                            )
                    except TileFailure as failure:
                        j += failure.position
                        raise failure.error from None
                    j = k
                else:
                    j = self._cut_band(current, batch, j, stop)
        except BaseException as exc:
            with batch.lock:
                batch.errors.append((j, exc))
        with batch.lock:
            batch.pending -= 1
            last = batch.pending == 0
        if last:
            self._finish(current, batch)

    def _cut_band(self, current: _Pass, batch: _Batch, j: int, stop: int) -> int:
        """Cut the batch's boxes j, j+1, ... of one band from it; return the next box."""
        plan, cache = self._bands, current.bands
        band = int(plan.of_box[batch.indices[j]])
        k = j + 1
        while k < stop and plan.of_box[batch.indices[k]] == band:
            k += 1
        counts = {band: k - j}
        pieces, mine = cache.claim(counts)
        piece = pieces[band]
        try:
            if mine:
                pixels, error = None, RuntimeError("reading the band was interrupted")
                try:
                    pixels, error = self._read_band(band), None
                except Exception as exc:  # SlideError, or whatever the reader raised
                    error = exc
                finally:
                    cache.fill(piece, pixels, error)
            cache.wait(piece)
            if piece.error is None:
                x0, width = int(plan.x0[band]), self.tile_shape[1]
                for p in range(j, k):
                    x = int(self._origins[batch.indices[p], 1]) - x0
                    batch.out[p] = piece.pixels[:, x : x + width]
        finally:
            cache.release(pieces, counts)
        if piece.error is not None:
            raise piece.error
        return k

    def _read_band(self, band: int) -> np.ndarray:
        """Read one band with Slide.read_region: its boxes' rows, its columns."""
        plan = self._bands
        x, y, _, h = self.boxes[plan.first[band]].tolist()
        columns = int(plan.width[band])
        width = _level0_width(columns, self._scale[1])
        pixels = self.slide.read_region(self.level, x, y, width, h)
        if pixels.shape[0] != self.tile_shape[0] or pixels.shape[1] < columns:
            raise RuntimeError(
                f"Slide.read_region gave {pixels.shape[:2]} pixels for a band of "
                f"{self.tile_shape[0]} x {columns}"
            )
        return pixels

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


def _band_bounds(bounds: list[int], of_box: np.ndarray) -> list[int]:
    """Chunk bounds of a batch moved to the nearest band boundaries.

    A band is read by the chunk that first needs it while the others that share it wait,
    so chunks of whole bands keep the threads on different bands.
    """
    starts = np.flatnonzero(of_box[1:] != of_box[:-1]) + 1
    if not len(starts):
        return [0, len(of_box)]
    inner = {int(starts[np.abs(starts - b).argmin()]) for b in bounds[1:-1]}
    return [0, *sorted(inner), len(of_box)]


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
