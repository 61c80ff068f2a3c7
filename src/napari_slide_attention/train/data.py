"""Tissue pieces as samples: their tile grids, labels, augmentation and tile chunks.

The grid-attention paper cuts each slide into its tissue pieces and trains on the
pieces; a piece takes the highest-risk class of the lesions inside it. Here a piece is
a ``PieceSample``: its level-0 box, its tile grid on the slide-wide lattice (so the maps
of all pieces line up on one slide-wide grid), its label, and the means to read its
tiles in chunks, in grid order, at the pyramid level closest to the model's input
resolution.

Augmentation (the paper: random rotation and random scaling 0.8-1.2, on the fly):
scaling changes the tile edge read from the slide (the grid is laid again with the
scaled tile, so the tissue content of a tile scales, not its resolution); rotation is
by multiples of 90 degrees with an optional flip, applied to the grid and to every tile
alike, so a rotated grid is exactly the grid of the rotated piece. Arbitrary angles
would mix the contents of neighbouring tiles, which a tile grid cannot express.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ..slide.reader import Slide
from ..slide.tissue import TileGrid, TissueMask, TissueParams, tile_grid, tissue_mask, tissue_pieces

__all__ = [
    "Augmentation",
    "PieceSample",
    "SlideView",
    "box_cells",
    "piece_label",
    "read_level_for",
    "read_tiles",
    "read_view",
    "slide_pieces",
    "tile_chunks",
    "tissue_statistics",
]

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Augmentation:
    """One draw of the paper's augmentation for one sample.

    Attributes:
        scale: tile edge multiplier (0.8-1.2 in the paper).
        rotations: quarter turns counter-clockwise (0-3).
        flip: mirror left-right after rotating.
    """

    scale: float = 1.0
    rotations: int = 0
    flip: bool = False

    @classmethod
    def draw(
        cls, rng: np.random.Generator, scale_range: tuple[float, float] = (0.8, 1.2)
    ) -> Augmentation:
        """A random augmentation: uniform scale in ``scale_range``, any quarter turn, flip."""
        lo, hi = scale_range
        return cls(float(rng.uniform(lo, hi)), int(rng.integers(4)), bool(rng.integers(2)))

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.rotations % 4 == 0 and not self.flip


@dataclass
class PieceSample:
    """One tissue piece of a slide, as a training or inference sample.

    Attributes:
        slide: the slide's path.
        piece: 1-based piece number (largest first, as ``tissue_pieces``).
        box: level-0 (x, y, w, h) of the piece.
        grid: the piece's tile grid (tiles in tissue are the model's cells).
        label: class index of the piece, or -1 when unknown.
        slide_label: class index of the slide, or -1 when unknown.
        lesions: level-0 boxes and class indices of the lesions inside the piece.
    """

    slide: str
    piece: int
    box: Box
    grid: TileGrid
    label: int = -1
    slide_label: int = -1
    lesions: list[tuple[Box, int]] = field(default_factory=list)
    mask: TissueMask | None = field(default=None, repr=False)

    @property
    def cells(self) -> torch.Tensor:
        """(N,) flat grid positions (row * W' + column) of the tissue tiles, row-major."""
        rows, cols = np.nonzero(self.grid.in_tissue)
        return torch.from_numpy((rows * self.grid.shape[1] + cols).astype(np.int64))

    @property
    def grid_shape(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.grid.shape)

    @property
    def n_tiles(self) -> int:
        return len(self.grid)

    def augmented(self, augmentation: Augmentation, min_tissue: float) -> PieceSample:
        """The same piece with its grid laid again for a scaled tile edge (no rotation here;
        ``tile_chunks`` rotates)."""
        if augmentation.scale == 1.0 or self.mask is None:
            return self
        tile = max(8, round(self.grid.tile_size * augmentation.scale))
        grid = tile_grid(self.mask, tile, min_tissue, box=self.box)
        if len(grid) == 0:
            return self
        return PieceSample(
            self.slide,
            self.piece,
            self.box,
            grid,
            self.label,
            self.slide_label,
            self.lesions,
            self.mask,
        )

    def lesion_cells(self) -> np.ndarray:
        """(H', W') bool: grid cells that overlap a lesion box."""
        return box_cells(
            [b for b, _ in self.lesions], self.grid.origin, self.grid.tile_size, self.grid.shape
        )


def box_cells(
    boxes: Sequence[Box], origin: tuple[int, int], tile_size: int, shape: tuple[int, int]
) -> np.ndarray:
    """(H', W') bool: the cells of a grid (level-0 origin, tile edge) that overlap any box."""
    out = np.zeros(tuple(shape), dtype=bool)
    x0, y0 = origin
    t = tile_size
    for x, y, w, h in boxes:
        c0, c1 = math.floor((x - x0) / t), math.ceil((x + w - x0) / t)
        r0, r1 = math.floor((y - y0) / t), math.ceil((y + h - y0) / t)
        out[max(r0, 0) : max(r1, 0), max(c0, 0) : max(c1, 0)] = True
    return out


def piece_label(
    box: Box, lesions: Sequence[tuple[Box, int]], default: int, risk: Sequence[int]
) -> int:
    """The paper's piece label: the highest-risk class of the lesions inside the piece.

    Args:
        box: level-0 box of the piece.
        lesions: (box, class index) of the slide's lesions.
        default: the class of a piece without lesions (the lowest-risk class).
        risk: class indices from lowest to highest risk.
    """
    rank = {c: i for i, c in enumerate(risk)}
    found = [cls for lbox, cls in lesions if _overlap(box, lbox) > 0]
    return max(found, key=lambda c: rank[c]) if found else default


def _overlap(a: Box, b: Box) -> int:
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0)


def tile_edge_px(slide: Slide, tile_um: float) -> int:
    """The tile edge in level-0 px for a tile of ``tile_um`` micrometres on this slide."""
    mpp = slide.mpp
    if mpp is None:
        raise ValueError(
            f"{slide.path}: the slide has no pixel size (mpp); give one with --mpp so that "
            f"tiles of {tile_um} µm can be cut"
        )
    return max(8, round(tile_um / ((mpp[0] + mpp[1]) / 2)))


def read_level_for(slide: Slide, tile_px: int, input_px: int) -> int:
    """The coarsest level whose resolution still gives ``input_px`` for a tile of ``tile_px``
    level-0 px (tiles are then resized down, never up-sampled from a coarser level)."""
    wanted = tile_px / input_px  # level-0 px per input px
    best = 0
    for info in slide.level_info:
        if info.downsample <= wanted * 1.001:
            best = info.index if info.downsample >= slide.level_info[best].downsample else best
    return best


def slide_pieces(
    slide: Slide,
    tile_px: int,
    *,
    min_tissue: float = 0.5,
    tissue: TissueParams | None = None,
    label: int = -1,
    lesions: Sequence[tuple[Box, int]] = (),
    risk: Sequence[int] = (),
    mask: TissueMask | None = None,
) -> list[PieceSample]:
    """The tissue pieces of a slide as samples, each with its tile grid and label.

    Args:
        slide: the opened slide.
        tile_px: tile edge in level-0 px.
        min_tissue: tissue fraction a tile needs to be one of the grid's cells.
        tissue: tissue detection settings.
        label: the slide's class index (-1 unknown).
        lesions: (level-0 box, class index) of known lesions; with them each piece gets
            the highest-risk class inside it (the lowest-risk class when none); without,
            every piece takes the slide's label.
        risk: class indices from lowest to highest risk.
        mask: a tissue mask already computed for this slide.

    Returns:
        The pieces with at least one tissue tile, largest first.
    """
    mask = mask if mask is not None else tissue_mask(slide, tissue)
    samples = []
    for piece in tissue_pieces(mask):
        grid = tile_grid(mask, tile_px, min_tissue, box=piece.box)
        if len(grid) == 0:
            continue
        inside = [(b, c) for b, c in lesions if _overlap(piece.box, b) > 0]
        if lesions or (label >= 0 and risk and label == risk[0]):
            piece_cls = piece_label(piece.box, inside, risk[0] if risk else 0, risk or [label])
        else:
            piece_cls = label
        samples.append(
            PieceSample(
                str(slide.path), piece.label, tuple(piece.box), grid, piece_cls, label, inside, mask
            )
        )
    return samples


def _rotate_grid(
    in_tissue: np.ndarray, augmentation: Augmentation
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Order of the tiles and cells of a rotated/flipped grid.

    Returns:
        order: (N,) for each cell of the new grid (row-major), the index of its tile in
            the original row-major tile list;
        cells: (N,) flat cell positions in the new grid;
        shape: the new grid shape.
    """
    index = np.full(in_tissue.shape, -1, dtype=np.int64)
    index[in_tissue] = np.arange(int(in_tissue.sum()))
    index = np.rot90(index, augmentation.rotations)
    if augmentation.flip:
        index = index[:, ::-1]
    flat = index.ravel()
    cells = np.nonzero(flat >= 0)[0]
    return flat[cells], cells, tuple(int(v) for v in index.shape)


def tile_chunks(
    slide: Slide,
    sample: PieceSample,
    level: int,
    *,
    chunk_tiles: int = 64,
    augmentation: Augmentation | None = None,
    prefetch: int = 1,
) -> tuple[Callable[[], Iterator[torch.Tensor]], torch.Tensor, tuple[int, int]]:
    """A re-callable source of a piece's tiles in grid order, and the grid it fills.

    Tiles are read at ``level`` in bands of grid rows with ``Slide.read_region`` on a
    background thread (so reading overlaps the model), cut, rotated and flipped as the
    augmentation says, and yielded as (n, h, w, 3) uint8 tensors of up to
    ``chunk_tiles`` tiles. Every call reads the same tiles in the same order, as the
    two-pass training step needs.

    Returns:
        chunks: call it to iterate over the chunks;
        cells: (N,) flat positions of the tiles in the (rotated) grid;
        grid_shape: (H', W') of the (rotated) grid.
    """
    augmentation = augmentation or Augmentation()
    grid = sample.grid
    in_tissue = grid.in_tissue
    order, cells, shape = _rotate_grid(in_tissue, augmentation)
    tile = grid.tile_size
    down = slide.level_info[level].downsample
    size = max(1, round(tile / down))  # tile edge at the level
    rows = np.nonzero(in_tissue.any(axis=1))[0]
    # a band: this many grid rows per read (about 8 MB of pixels at the level)
    width_px = max(1, round(grid.shape[1] * tile / down))
    band_rows = max(1, min(len(rows), (8 << 20) // max(1, width_px * size * 3)))
    identity_order = augmentation.rotations % 4 == 0 and not augmentation.flip

    def read_band(r0: int, r1: int) -> list[np.ndarray]:
        x0, y0 = grid.origin
        band = slide.read_region(level, x0, y0 + r0 * tile, grid.shape[1] * tile, (r1 - r0) * tile)
        tiles = []
        for r in range(r0, r1):
            y = round((r - r0) * tile / down)
            for c in np.nonzero(in_tissue[r])[0]:
                x = round(c * tile / down)
                piece = band[y : y + size, x : x + size]
                if piece.shape[:2] != (size, size):  # rounding at the band's edge
                    piece = np.pad(
                        piece,
                        ((0, size - piece.shape[0]), (0, size - piece.shape[1]), (0, 0)),
                        mode="edge",
                    )
                tiles.append(piece)
        return tiles

    def oriented(t: np.ndarray) -> np.ndarray:
        t = np.rot90(t, augmentation.rotations)
        return t[:, ::-1] if augmentation.flip else t

    # consecutive bands of grid rows covering the rows that hold tissue tiles
    first, last = int(rows[0]), int(rows[-1]) + 1
    bands = [(r, min(r + band_rows, last)) for r in range(first, last, band_rows)]

    def chunks() -> Iterator[torch.Tensor]:
        if identity_order:
            yield from _chunked(_stream_bands(read_band, bands, prefetch), chunk_tiles, len(order))
        else:
            # a rotated grid reorders the tiles: collect them all (N tiles at the level,
            # the read size of the piece), then emit in the new order
            everything = list(_stream_bands(read_band, bands, prefetch))
            yield from _chunked((oriented(everything[i]) for i in order), chunk_tiles, len(order))

    return chunks, torch.from_numpy(cells), shape


def _stream_bands(
    read_band: Callable[[int, int], list[np.ndarray]], bands: list[tuple[int, int]], prefetch: int
) -> Iterator[np.ndarray]:
    if prefetch <= 0 or len(bands) <= 1:
        for r0, r1 in bands:
            yield from read_band(r0, r1)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="piece-bands") as pool:
        pending = [pool.submit(read_band, *bands[i]) for i in range(min(prefetch + 1, len(bands)))]
        next_band = len(pending)
        while pending:
            tiles = pending.pop(0).result()
            if next_band < len(bands):
                pending.append(pool.submit(read_band, *bands[next_band]))
                next_band += 1
            yield from tiles


def _chunked(tiles: Iterator[np.ndarray], n: int, total: int) -> Iterator[torch.Tensor]:
    """Stack tiles into ``ceil(total / n)`` chunks of nearly equal size (at most ``n``):
    no tiny last chunk, whose batch statistics would be poor (or undefined for one tile)."""
    count = max(1, math.ceil(total / n))
    sizes = [total // count + (i < total % count) for i in range(count)]
    batch: list[np.ndarray] = []
    k = 0
    for t in tiles:
        batch.append(t)
        if len(batch) == sizes[k]:
            yield torch.from_numpy(np.ascontiguousarray(np.stack(batch)))
            batch = []
            k = min(k + 1, count - 1)
    if batch:
        yield torch.from_numpy(np.ascontiguousarray(np.stack(batch)))


def tissue_statistics(
    tiles: Sequence[np.ndarray] | Iterator[np.ndarray], *, white: int = 220
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and std, in [0, 1], of the tissue pixels of some tiles.

    The paper normalises with the mean and std of tissue pixels; pixels brighter than
    ``white`` in every channel count as glass and are left out.
    """
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for t in tiles:
        pixels = np.asarray(t).reshape(-1, 3)
        keep = pixels[~(pixels >= white).all(axis=1)].astype(np.float64) / 255.0
        total += keep.sum(0)
        total_sq += (keep**2).sum(0)
        count += len(keep)
    if count == 0:
        raise ValueError("no tissue pixels to compute the normalisation from")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-8))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


@dataclass(frozen=True)
class SlideView:
    """A whole slide at low power with its tissue mask (the dual model's soft-attention input).

    Attributes:
        image: (h, w, 3) uint8, the slide at ``downsample``.
        tissue: (h, w) bool tissue mask on the same pixels.
        downsample: level-0 px per view px (the same on both axes).
    """

    image: np.ndarray
    tissue: np.ndarray
    downsample: float

    @property
    def shape(self) -> tuple[int, int]:
        """(h, w) of the view."""
        return self.image.shape[:2]  # type: ignore[return-value]


def read_view(
    slide: Slide,
    downsample: float = 32.0,
    *,
    tissue: TissueParams | None = None,
    mask: TissueMask | None = None,
) -> SlideView:
    """The slide at ``downsample`` (the dual-attention paper's 2.5x view: x32 from 40x) and
    its tissue mask, ``ceil(level-0 size / downsample)`` px on each side.

    Read from the finest level not finer than needed (never up-sampled from a coarser
    one) and resized with antialiasing; the tissue mask (``tissue_mask``, or ``mask``)
    is resampled onto the view's pixels by their level-0 position.

    Raises:
        ValueError: ``downsample`` is not positive, or the view would be empty.
    """
    if not downsample > 0:
        raise ValueError(f"the view's downsample must be positive, got {downsample}")
    width, height = slide.dimensions
    out_h, out_w = max(1, math.ceil(height / downsample)), max(1, math.ceil(width / downsample))
    level = 0
    for info in slide.level_info:
        if (
            info.downsample <= downsample * 1.001
            and info.downsample >= slide.level_info[level].downsample
        ):
            level = info.index
    pixels = slide.read_region(level, 0, 0, width, height)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    image = _resize_uint8(pixels[..., :3], (out_h, out_w))
    mask = mask if mask is not None else tissue_mask(slide, tissue)
    return SlideView(
        image, mask.resize_to((out_h, out_w), downsample=downsample), float(downsample)
    )


def read_tiles(slide: Slide, boxes: np.ndarray, size: int) -> np.ndarray:
    """Level-0 boxes read at the level closest to ``size`` px and resized to ``size`` square.

    Args:
        slide: the opened slide.
        boxes: (N, 4) level-0 (x, y, w, h), all squares of one size.
        size: output edge in px.

    Returns:
        (N, size, size, 3) uint8; parts outside the slide are the slide's fill (glass).
    """
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    out = np.empty((len(boxes), size, size, 3), dtype=np.uint8)
    if not len(boxes):
        return out
    level = read_level_for(slide, int(boxes[0, 2]), size)
    for i, (x, y, w, h) in enumerate(boxes.tolist()):
        pixels = slide.read_region(level, x, y, w, h)
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[..., None], 3, axis=2)
        out[i] = _resize_uint8(pixels[..., :3], (size, size))
    return out


def _resize_uint8(pixels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(h, w, 3) uint8 resized to ``shape`` with antialiasing (area-like when shrinking)."""
    if pixels.shape[:2] == tuple(shape):
        return np.ascontiguousarray(pixels)
    t = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None].float()
    t = torch.nn.functional.interpolate(
        t, size=shape, mode="bilinear", antialias=True, align_corners=False
    )
    return t[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()
