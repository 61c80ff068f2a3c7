"""Decode the stored tiles of one tiled TIFF page for ``TileStream`` (slide/stream.py).

A box of any size and alignment is made from the stored tiles it overlaps. Two ways:

* ``StoredLevel.read_boxes``: boxes aligned with the stored tiles whose tiles no other box
  needs; each tile is decoded straight into its place in the batch array.
* ``StoredLevel.assemble_boxes``: every other box; its stored tiles are decoded into a
  ``SharedPieces`` cache, once per pass, and the needed parts are copied into the box.
  A tile stays in the cache until the last box that needs it has taken its part, so the
  tiles that neighbouring boxes share (also across batches) are decoded once.

Bytes are read with ``os.pread`` on the pass's own file descriptor (no shared file
position, so no lock); stored tiles that lie back to back in the file are fetched by one
read. Every decode goes through ``StoredLevel.decode``, with the decoder tifffile itself
uses, so the pixels equal ``Slide.read_region``'s.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import imagecodecs
import numpy as np
import tifffile

from .reader import Slide, SlideError

__all__ = [
    "JPEG_ROW_OFFSET",
    "SharedPieces",
    "StoredLevel",
    "TileFailure",
    "TilePlan",
    "offset_empty",
    "pread",
    "spare_tiles",
    "stored_tiles_problem",
]

# TIFF compression code of (new-style) JPEG.
_JPEG = 7
# Stored tiles closer than this in the file are fetched by one read (the bytes between
# are read and dropped), up to this many bytes per read.
_READ_GAP = 4096
_READ_SPAN = 8 << 20
# libjpeg-turbo's x86 SIMD colour conversion writes an output row that starts on a 32-byte
# (AVX2) or 16-byte (SSE2) boundary with non-temporal stores, which go around the cache:
# decoding such a tile took ~20 % more CPU here, and the consumer then reads the batch back
# from memory. Arrays decoded by libjpeg-turbo therefore start this many bytes past a
# 64-byte boundary; TIFF tile widths are multiples of 16 px, so every row of every tile in
# the array is 8 bytes off a 16-byte boundary and takes the cached stores.
JPEG_ROW_OFFSET = 8
# Buffers of dropped tiles kept for reuse, most recently dropped first (still in the
# cache): fresh pages cost page faults, cold ones cache misses (together ~15 % of decoding
# a JPEG tile). Boxes drop and decode a few tiles each, so a few per thread suffice.
_SPARE_TILES_PER_WORKER = 32
_SPARE_TILES = 16


def offset_empty(shape: tuple[int, ...], dtype: np.dtype, offset: int) -> np.ndarray:
    """An uninitialised array whose data starts ``offset`` bytes past a 64-byte boundary.

    The array is a view of a larger uint8 buffer (its ``base``), so that holders of views
    of it can still be counted (see ``stream._refcounts``).
    """
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + 64 + offset, dtype=np.uint8)
    start = (offset - raw.ctypes.data) % 64
    return raw[start : start + nbytes].view(dtype).reshape(shape)


class TileFailure(Exception):
    """A tile of a run of boxes failed; carries the box's position in the run."""

    def __init__(self, position: int, error: BaseException):
        super().__init__(position, error)
        self.position = position
        self.error = error


if hasattr(os, "pread"):
    pread = os.pread
else:  # Windows: no pread; serialise seek + read on the shared descriptor
    _pread_lock = threading.Lock()

    def pread(fd: int, count: int, offset: int) -> bytes:
        with _pread_lock:
            os.lseek(fd, offset, os.SEEK_SET)
            return os.read(fd, count)


def _read_runs(
    fd: int, file_size: int, spans: Sequence[tuple[int, int]]
) -> Iterator[memoryview | None]:
    """The bytes of each (offset, count) span in order, None for one past the file's end.

    Spans that follow each other in the file closely (``_READ_GAP``) are fetched by one
    read of at most ``_READ_SPAN`` bytes; give them sorted by offset to profit.
    """
    start = 0
    while start < len(spans):
        first, count = spans[start]
        end = first + count
        stop = start + 1
        while stop < len(spans):
            offset, count = spans[stop]
            if not (end <= offset <= end + _READ_GAP and offset + count - first <= _READ_SPAN):
                break
            end = offset + count
            stop += 1
        # Read what the file has; a span that does not fit is reported when reached,
        # after the ones before it have been handed out.
        data = pread(fd, min(end, file_size) - first, first) if first < file_size else b""
        view = memoryview(data)
        for offset, count in spans[start:stop]:
            if offset + count - first > len(data):
                yield None
            else:
                yield view[offset - first : offset - first + count]
        start = stop


def stored_tiles_problem(slide: Slide, level: int) -> str:
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


# -- the cache shared by the boxes of a pass -----------------------------------------------


class _Piece:
    """One cached piece (a decoded stored tile or a band): filled once, then read."""

    __slots__ = ("done", "error", "key", "nbytes", "owned", "pins", "pixels", "private")

    def __init__(self, key: int, private: bool):
        self.key = key
        # No box but its claimant's will ask for it: the claimant uses it and forgets it,
        # and fills it without pixels.
        self.private = private
        self.pixels: np.ndarray | None = None
        self.error: BaseException | None = None
        self.done = False  # filled (pixels or error)
        self.nbytes = 0
        self.owned = False  # pixels came from SharedPieces.buffer() and may be reused
        self.pins = 0  # claimants holding it right now (between claim and release)


class SharedPieces:
    """Decoded pieces shared by the boxes of one pass, each made once, kept while needed.

    The box uses of each piece are counted when the stream is made (``uses``). A worker
    ``claim``s the pieces of a run of boxes: the first claimant of a missing piece makes
    it (and must ``fill`` it, with pixels or an error), later ones ``wait`` for it.
    ``release`` counts the uses; a piece whose uses are all done is dropped at once. Over
    ``limit`` bytes, pieces nobody holds are dropped too, the one needed last (by
    ``last``, the position of its last box) first, and made again when asked for.

    A claimant makes all the pieces it claimed before it waits for anyone else's, so no
    two claimants can wait on each other.

    Args:
        uses: number of box uses of each piece, by key.
        limit: bytes of pieces kept for later boxes; pieces being used can exceed it.
        last: position of the last box that needs each piece, by key (for dropping).
        new_buffer: makes an empty array for a piece (for ``buffer``).
        spares: buffers of dropped pieces kept for reuse.
    """

    def __init__(
        self,
        uses: dict[int, int],
        limit: float,
        *,
        last: dict[int, int] | None = None,
        new_buffer: Callable[[], np.ndarray] | None = None,
        spares: int = 0,
    ):
        self._uses = dict(uses)
        self._limit = limit
        self._last = last or {}
        self._new_buffer = new_buffer
        self._max_spares = spares
        self._spares: list[np.ndarray] = []
        self._pieces: dict[int, _Piece] = {}
        self._lock = threading.Lock()
        self._filled = threading.Condition(self._lock)
        self._waiting = 0
        self.nbytes = 0
        self.peak_nbytes = 0
        self.made = 0

    def claim(self, counts: dict[int, int]) -> tuple[dict[int, _Piece], list[_Piece]]:
        """The pieces of ``counts``'s keys and those of them the caller must make.

        Args:
            counts: key -> uses the caller will make of the piece before ``release``.
        """
        pieces, mine = {}, []
        with self._lock:
            for key, count in counts.items():
                piece = self._pieces.get(key)
                if piece is None:
                    piece = _Piece(key, self._uses.get(key, 0) <= count)
                    self._pieces[key] = piece
                    mine.append(piece)
                piece.pins += 1
                pieces[key] = piece
            self.made += len(mine)
        return pieces, mine

    def buffer(self) -> np.ndarray:
        """An array to make a piece in (the last dropped piece's, or a new one)."""
        with self._lock:
            if self._spares:
                return self._spares.pop()
        return self._new_buffer()

    def fill(
        self,
        piece: _Piece,
        pixels: np.ndarray | None = None,
        error: BaseException | None = None,
        *,
        owned: bool = False,
    ) -> None:
        """Hand over a claimed piece: its pixels, or the error that making it raised."""
        with self._lock:
            piece.pixels, piece.error, piece.owned = pixels, error, owned
            if pixels is not None and error is None:
                piece.nbytes = pixels.nbytes
                self.nbytes += piece.nbytes
                self.peak_nbytes = max(self.peak_nbytes, self.nbytes)
            piece.done = True
            if self._waiting:
                self._filled.notify_all()

    def wait(self, piece: _Piece) -> None:
        """Wait until a piece another claimant makes is filled."""
        with self._lock:
            while not piece.done:
                self._waiting += 1
                try:
                    self._filled.wait()
                finally:
                    self._waiting -= 1

    def spare(self, array: np.ndarray) -> None:
        """Take back a buffer that was not used after all."""
        with self._lock:
            if len(self._spares) < self._max_spares:
                self._spares.append(array)

    def release(self, pieces: dict[int, _Piece], counts: dict[int, int]) -> None:
        """A claimant is done with its pieces, having used each ``counts[key]`` times."""
        with self._lock:
            for key, piece in pieces.items():
                piece.pins -= 1
                remaining = self._uses.get(key, 0) - counts[key]
                self._uses[key] = remaining
                if remaining <= 0 and piece.pins == 0:
                    self._drop(piece)
            if self.nbytes > self._limit:
                held = [p for p in self._pieces.values() if p.pins == 0 and p.done]
                held.sort(key=lambda p: self._last.get(p.key, 0), reverse=True)
                for piece in held:
                    if self.nbytes <= self._limit:
                        break
                    self._drop(piece)

    def _drop(self, piece: _Piece) -> None:
        if self._pieces.get(piece.key) is piece:
            del self._pieces[piece.key]
        self.nbytes -= piece.nbytes
        piece.nbytes = 0
        if piece.owned and len(self._spares) < self._max_spares:
            self._spares.append(piece.pixels)
        piece.pixels = None  # a later claim makes the piece again


# -- the stored level --------------------------------------------------------------------


@dataclass(frozen=True)
class TilePlan:
    """How the boxes of a stream use a level's stored tiles (made by ``StoredLevel.plan``).

    Attributes:
        direct: (n,) bool, boxes whose stored tiles are decoded straight into the batch.
        uses: stored tile index -> number of the assembled (not direct) boxes that need it.
        last: stored tile index -> position of the last of those boxes.
        needed: distinct stored tiles (with data) that the boxes need: the decodes of a
            pass when the cache holds every shared tile until its last use.
        peak_tiles: most shared tiles held at once when the boxes are read in order with
            ``window`` boxes in flight.
    """

    direct: np.ndarray
    uses: dict[int, int]
    last: dict[int, int]
    needed: int
    peak_tiles: int


class StoredLevel:
    """Reads and decodes the stored tiles of one tiled TIFF page."""

    def __init__(self, slide: Slide, level: int, page: tifffile.TiffPage):
        self.path = slide.path
        self.level = level
        self.fill = slide.fill_value
        self.tile_h, self.tile_w = int(page.tilelength), int(page.tilewidth)
        self.height, self.width = int(page.imagelength), int(page.imagewidth)
        self.down = math.ceil(self.height / self.tile_h)
        self.across = math.ceil(self.width / self.tile_w)
        # A directory may list more offsets than tiles (slide.tiff_checks refuses fewer);
        # tifffile reads the first ones, and so do we.
        tiles = self.down * self.across
        self.offsets = [int(v) for v in page.dataoffsets[:tiles]]
        self.counts = [int(v) for v in page.databytecounts[:tiles]]
        # Tiles never written (sparse files) have offset or byte count 0: glass.
        self.present = [o != 0 and n != 0 for o, n in zip(self.offsets, self.counts, strict=True)]
        self.squeeze = slide.levels[level].ndim == 2
        self.dtype = np.dtype(slide.levels[level].dtype)
        self.tile_shape = (self.tile_h, self.tile_w, *slide.levels[level].shape[2:])
        self.tile_nbytes = math.prod(self.tile_shape) * self.dtype.itemsize
        self._local = threading.local()  # per thread: a scratch tile
        # How box rows and columns fall on the stored tiles, by (start, length).
        self._row_segments: dict[tuple[int, int], tuple[list[tuple[int, ...]], bool]] = {}
        self._col_segments: dict[tuple[int, int], tuple[list[tuple[int, ...]], bool]] = {}
        # The closure tifffile itself decodes with (what read_region ends up calling), so
        # both paths give identical pixels for every compression tifffile supports.
        self._decode_page = page.decode
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

    # -- planning ------------------------------------------------------------------------
    def plan(self, origins: np.ndarray, shape: tuple[int, int], window: int) -> TilePlan:
        """Decide how each box is read and count the uses of every stored tile.

        Args:
            origins: (n, 2) level origins (y, x) of the boxes.
            shape: (h, w) of a box at the level.
            window: boxes that may be in flight at once (for ``peak_tiles``).
        """
        n = len(origins)
        th, tw = self.tile_h, self.tile_w
        boxes, tiles = self._box_tiles(origins, shape)
        counts = np.bincount(tiles, minlength=self.down * self.across)
        present = np.asarray(self.present, dtype=bool)
        # A box reads its tiles straight into the batch when it covers whole stored tiles
        # that no other box needs; shared tiles go through the cache, decoded once.
        shared = np.bincount(boxes, weights=counts[tiles] > 1, minlength=n) > 0
        aligned = (origins[:, 0] % th == 0) & (origins[:, 1] % tw == 0)
        direct = aligned & (shape[0] % th == 0) & (shape[1] % tw == 0) & ~shared
        cached = ~direct[boxes] & present[tiles]
        boxes, tiles = boxes[cached], tiles[cached]
        keys, uses = np.unique(tiles, return_counts=True)
        first = np.full(len(counts), n, dtype=np.int64)
        last = np.full(len(counts), -1, dtype=np.int64)
        np.minimum.at(first, tiles, boxes)
        np.maximum.at(last, tiles, boxes)
        # A tile is held from when the first box needing it may start (up to `window`
        # boxes ahead of the oldest unfinished one) until its last box is done.
        live = np.zeros(n + 2, dtype=np.int64)
        np.add.at(live, np.maximum(first[keys] - window, 0), 1)
        np.add.at(live, last[keys] + 1, -1)
        return TilePlan(
            direct=direct,
            uses=dict(zip(keys.tolist(), uses.tolist(), strict=True)),
            last=dict(zip(keys.tolist(), last[keys].tolist(), strict=True)),
            needed=int(np.count_nonzero((counts > 0) & present)),
            peak_tiles=int(np.cumsum(live).max()) if len(keys) else 0,
        )

    def _box_tiles(self, origins: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, ...]:
        """(box positions, stored tile indices): every stored tile each box overlaps."""
        th, tw = self.tile_h, self.tile_w
        y0 = np.clip(origins[:, 0], 0, self.height)
        y1 = np.clip(origins[:, 0] + shape[0], 0, self.height)
        x0 = np.clip(origins[:, 1], 0, self.width)
        x1 = np.clip(origins[:, 1] + shape[1], 0, self.width)
        inside = (y1 > y0) & (x1 > x0)
        r0, r1 = y0 // th, (y1 - 1) // th
        c0, c1 = x0 // tw, (x1 - 1) // tw
        boxes, tiles = [], []
        for dr in range(math.ceil(shape[0] / th) + 1):
            for dc in range(math.ceil(shape[1] / tw) + 1):
                which = np.flatnonzero(inside & (r0 + dr <= r1) & (c0 + dc <= c1))
                boxes.append(which)
                tiles.append((r0[which] + dr) * self.across + c0[which] + dc)
        return np.concatenate(boxes), np.concatenate(tiles)

    # -- decoding ------------------------------------------------------------------------
    def new_tile(self) -> np.ndarray:
        """An empty array for one decoded stored tile."""
        if self.direct_jpeg:
            return offset_empty(self.tile_shape, self.dtype, JPEG_ROW_OFFSET)
        return np.empty(self.tile_shape, dtype=self.dtype)

    def decode(self, data: memoryview, dest: np.ndarray, r: int, c: int, index: int) -> None:
        """Decode stored tile ``index`` (row ``r``, column ``c``) into ``dest``.

        ``dest`` is the tile's place in the output, (tile_h, tile_w[, channels]); the part
        past the level's edge is set to the fill value.

        Raises:
            SlideError: the tile cannot be decoded (named by level, row and column).
        """
        valid_h = min(self.tile_h, self.height - r * self.tile_h)
        valid_w = min(self.tile_w, self.width - c * self.tile_w)
        whole = valid_h == self.tile_h and valid_w == self.tile_w
        if self.direct_jpeg and whole:
            # libjpeg-turbo writes whole rows: a tile inside a wider box goes through this
            # thread's scratch tile (which stays in the CPU's cache).
            contiguous = dest.flags.c_contiguous
            try:
                imagecodecs.jpeg8_decode(
                    data,
                    tables=self.jpegtables,
                    colorspace=self.colorspace,
                    outcolorspace=self.outcolorspace,
                    out=dest if contiguous else self._scratch(),
                )
                if not contiguous:
                    dest[...] = self._scratch()
                return
            except Exception:
                pass  # tifffile's own decoder below gets the last word
        try:
            tile = self._decode_page(
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

    # -- aligned boxes, straight into the batch ------------------------------------------
    def read_boxes(self, out: np.ndarray, origins: np.ndarray, fd: int, file_size: int) -> None:
        """Fill ``out[k]`` with the aligned box whose level origin (y, x) is ``origins[k]``.

        Raises:
            TileFailure: wrapping the SlideError of the first tile that fails, with the
                position of its box in ``out``.
        """
        th, tw = self.tile_h, self.tile_w
        out_h, out_w = out.shape[1:3]
        single = out_h == th and out_w == tw
        across, down = self.across, self.down
        offsets, counts, present, fill = self.offsets, self.counts, self.present, self.fill
        # Plan first, then read: stored tiles that lie back to back in the file (the
        # usual row-major layout) are fetched with one pread instead of one per tile.
        plan: list[tuple[np.ndarray, int, int, int, int]] = []
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
                    if not present[index]:
                        dest[...] = fill  # never written (sparse file): glass, as the reader
                        continue
                    plan.append((dest, r, c, index, position))
        spans = [(offsets[item[3]], counts[item[3]]) for item in plan]
        for (dest, r, c, index, position), data in zip(
            plan, _read_runs(fd, file_size, spans), strict=True
        ):
            if data is None:
                raise TileFailure(position, self._truncated(r, c, file_size))
            try:
                self.decode(data, dest, r, c, index)
            except SlideError as exc:
                raise TileFailure(position, exc) from None

    # -- any box, from the shared cache --------------------------------------------------
    def assemble_boxes(
        self,
        out: np.ndarray,
        origins: np.ndarray,
        fd: int,
        file_size: int,
        cache: SharedPieces,
    ) -> None:
        """Fill ``out[k]`` with the box whose level origin (y, x) is ``origins[k]``.

        The boxes' stored tiles that are not in the cache are decoded by this call, in file
        order, each copied at once (while still in the CPU's cache) into every box of the
        run that needs it, and kept in the cache for later boxes; tiles another thread
        decodes are copied when it is done.

        Raises:
            TileFailure: wrapping the SlideError of the first tile (row-major) of the first
                box that cannot be read, with the position of that box in ``out``.
        """
        fill, present, across = self.fill, self.present, self.across
        out_h, out_w = out.shape[1:3]
        # tile -> the parts of it the boxes take: (box, dest rows, dest cols, tile rows, cols)
        parts: dict[int, list[tuple[int, ...]]] = {}
        box_tiles: list[list[int]] = []
        for position, (ly, lx) in enumerate(origins.tolist()):
            rows, all_rows = self._segments(self._row_segments, ly, out_h, self.tile_h, self.height)
            cols, all_cols = self._segments(self._col_segments, lx, out_w, self.tile_w, self.width)
            keys: list[int] = []
            box_tiles.append(keys)
            if not (all_rows and all_cols):
                _fill_outside(out[position], rows, cols, fill)
            for r, dy0, dy1, sy0, sy1 in rows:
                for c, dx0, dx1, sx0, sx1 in cols:
                    index = r * across + c
                    if not present[index]:
                        out[position, dy0:dy1, dx0:dx1] = fill  # never written: glass
                        continue
                    keys.append(index)
                    part = (position, dy0, dy1, dx0, dx1, sy0, sy1, sx0, sx1)
                    taken = parts.get(index)
                    if taken is None:
                        parts[index] = [part]
                    else:
                        taken.append(part)
        if not parts:
            return
        counts = {key: len(taken) for key, taken in parts.items()}
        pieces, mine = cache.claim(counts)
        try:
            made = self._make(mine, parts, out, cache, fd, file_size) if mine else set()
            waiting = []
            for key, piece in pieces.items():
                if key in made:
                    continue
                if piece.done:
                    if piece.error is None:
                        _copy(out, piece.pixels, parts[key])
                else:
                    waiting.append(piece)
            for piece in waiting:
                cache.wait(piece)
                if piece.error is None:
                    _copy(out, piece.pixels, parts[piece.key])
        finally:
            cache.release(pieces, counts)
        if any(piece.error is not None for piece in pieces.values()):
            for position, keys in enumerate(box_tiles):
                for key in keys:
                    if pieces[key].error is not None:
                        raise TileFailure(position, pieces[key].error)

    def _make(
        self,
        mine: list[_Piece],
        parts: dict[int, list[tuple[int, ...]]],
        out: np.ndarray,
        cache: SharedPieces,
        fd: int,
        file_size: int,
    ) -> set[int]:
        """Decode the claimed tiles, copy them into the run's boxes, hand them to the cache.

        Errors are handed over to the cache (and so to every box of the tile), not raised.
        Returns the keys of the tiles dealt with.
        """
        offsets, counts = self.offsets, self.counts
        mine = sorted(mine, key=lambda piece: offsets[piece.key])
        spans = [(offsets[piece.key], counts[piece.key]) for piece in mine]
        made: set[int] = set()
        try:
            for piece, data in zip(mine, _read_runs(fd, file_size, spans), strict=True):
                key = piece.key
                r, c = divmod(key, self.across)
                made.add(key)
                if data is None:
                    cache.fill(piece, error=self._truncated(r, c, file_size))
                    continue
                # A tile no later box needs is decoded into this thread's scratch tile.
                tile = self._scratch() if piece.private else cache.buffer()
                try:
                    self.decode(data, tile, r, c, key)
                except SlideError as exc:
                    if not piece.private:
                        cache.spare(tile)
                    cache.fill(piece, error=exc)
                    continue
                _copy(out, tile, parts[key])
                if piece.private:
                    cache.fill(piece)
                else:
                    cache.fill(piece, tile, owned=True)
        finally:
            # Whatever stopped us, claimants waiting on these tiles must wake up.
            for piece in mine:
                if not piece.done:
                    cache.fill(piece, error=RuntimeError("reading the tile was interrupted"))
        return made

    @staticmethod
    def _segments(
        memo: dict[tuple[int, int], tuple[list[tuple[int, ...]], bool]],
        start: int,
        length: int,
        tile: int,
        extent: int,
    ) -> tuple[list[tuple[int, ...]], bool]:
        """How [start, start + length) of one axis falls on the stored tiles.

        Returns (segments, whether they cover all of it); a segment is (tile number,
        start and end in the box, start and end in the tile). Boxes of a grid share their
        rows and columns, so the answers are kept in ``memo``.
        """
        found = memo.get((start, length))
        if found is None:
            lo, hi = max(start, 0), min(start + length, extent)
            segments = []
            for k in range(lo // tile, (hi - 1) // tile + 1) if lo < hi else ():
                a, b = max(lo, k * tile), min(hi, (k + 1) * tile)
                segments.append((k, a - start, b - start, a - k * tile, b - k * tile))
            found = memo[(start, length)] = (segments, hi - lo == length)
        return found

    def _scratch(self) -> np.ndarray:
        """This thread's buffer for a tile decoded, used and forgotten."""
        tile = getattr(self._local, "tile", None)
        if tile is None:
            tile = self._local.tile = self.new_tile()
        return tile


def _fill_outside(
    box: np.ndarray, rows: list[tuple[int, ...]], cols: list[tuple[int, ...]], fill: int
) -> None:
    """Set the part of a box outside the slide (outside its rows' and columns' segments)."""
    if not rows or not cols:
        box[...] = fill
        return
    y0, y1 = rows[0][1], rows[-1][2]
    x0, x1 = cols[0][1], cols[-1][2]
    box[:y0] = fill
    box[y1:] = fill
    box[y0:y1, :x0] = fill
    box[y0:y1, x1:] = fill


def _copy(out: np.ndarray, tile: np.ndarray, parts: list[tuple[int, ...]]) -> None:
    """Copy the parts of a decoded tile into the boxes of ``out`` that take them."""
    for position, dy0, dy1, dx0, dx1, sy0, sy1, sx0, sx1 in parts:
        out[position, dy0:dy1, dx0:dx1] = tile[sy0:sy1, sx0:sx1]


def spare_tiles(workers: int) -> int:
    """Decoded tile buffers to keep for reuse in a pass with ``workers`` threads."""
    return _SPARE_TILES_PER_WORKER * workers + _SPARE_TILES
