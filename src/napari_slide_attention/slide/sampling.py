"""Tissue pieces as samples: their tile grids, labels, augmentation and tile reads.

The grid-attention paper cuts each slide into its tissue pieces and trains on the
pieces; a piece takes the highest-risk class of the lesions inside it. Here a piece is
a ``PieceSample``: its level-0 box, its tile grid on the slide-wide lattice (so the maps
of all pieces line up on one slide-wide grid), its label, and the means to read its
tiles in chunks, in grid order, at the pyramid level closest to the model's input
resolution, through the one fast tile reader (``TileStream``).

Augmentation (the paper: random rotation and random scaling 0.8-1.2, on the fly):
scaling changes the tile edge read from the slide (the grid is laid again with the
scaled tile, so the tissue content of a tile scales, not its resolution); rotation is
by multiples of 90 degrees with an optional flip, applied to the grid and to every tile
alike, so a rotated grid is exactly the grid of the rotated piece. Arbitrary angles
would mix the contents of neighbouring tiles, which a tile grid cannot express.

Everything here is numpy: tiles come out as uint8 arrays and the models' layers turn
them into tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from skimage.transform import resize

from .boxes import Box, overlap_area
from .reader import Slide
from .stream import TileStream
from .tissue import TileGrid, TissueMask, TissueParams, tile_grid, tissue_mask, tissue_pieces

__all__ = [
    "Augmentation",
    "PieceSample",
    "PieceTiles",
    "SlideView",
    "piece_label",
    "piece_tiles",
    "read_level_for",
    "read_tiles",
    "read_view",
    "slide_pieces",
    "tile_edge_px",
    "tissue_statistics",
]


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
    def cells(self) -> np.ndarray:
        """(N,) int64 flat grid positions (row * W' + column) of the tissue tiles, row-major."""
        rows, cols = np.nonzero(self.grid.in_tissue)
        return (rows * self.grid.shape[1] + cols).astype(np.int64)

    @property
    def grid_shape(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.grid.shape)

    @property
    def n_tiles(self) -> int:
        return len(self.grid)

    def augmented(self, augmentation: Augmentation, min_tissue: float) -> PieceSample:
        """The same piece with its grid laid again for a scaled tile edge (no rotation here;
        ``piece_tiles`` rotates)."""
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
    found = [cls for lbox, cls in lesions if overlap_area(box, lbox) > 0]
    return max(found, key=lambda c: rank[c]) if found else default


# A tile's edge in level-0 px, from its µm and the slide's mpp, must lie in these bounds.
MIN_TILE_PX, MAX_TILE_PX = 8, 16384


def tile_edge_px(slide: Slide, tile_um: float) -> int:
    """The tile edge in level-0 px for a tile of ``tile_um`` micrometres on this slide."""
    mpp = slide.mpp
    if mpp is None:
        raise ValueError(
            f"{slide.path}: the slide has no pixel size (mpp); give one with --mpp so that "
            f"tiles of {tile_um} µm can be cut"
        )
    edge = tile_um / ((mpp[0] + mpp[1]) / 2)
    if not MIN_TILE_PX <= edge <= MAX_TILE_PX:
        # A wrong pixel size (an --mpp typo, a scanner's bad metadata) would otherwise cut
        # millions of tiles of a few pixels, or one tile larger than any slide.
        raise ValueError(
            f"{slide.path}: at {mpp[0]:g} µm/px a tile of {tile_um:g} µm is {edge:.3g} px; "
            f"tiles must be {MIN_TILE_PX} to {MAX_TILE_PX} px (is the pixel size right? "
            "--mpp sets it)"
        )
    return round(edge)


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
        inside = [(b, c) for b, c in lesions if overlap_area(piece.box, b) > 0]
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


@dataclass(frozen=True)
class PieceTiles:
    """A piece's tissue tiles in (rotated) grid order, in batches; iterate as often as
    needed (each pass reads the same tiles in the same order, as the two-pass training
    step needs).

    Attributes:
        stream: the ``TileStream`` over the piece's tiles, row-major (before rotation).
        cells: (N,) int64 flat positions of the tiles in the (rotated) grid.
        shape: (H', W') of the (rotated) grid.
        augmentation: the rotation and flip applied to the grid and every tile.
    """

    stream: TileStream
    cells: np.ndarray
    shape: tuple[int, int]
    augmentation: Augmentation
    order: np.ndarray = field(repr=False)

    def __len__(self) -> int:
        """Number of tiles."""
        return len(self.cells)

    def __iter__(self) -> Iterator[np.ndarray]:
        """(n, h, w, C) uint8 batches of tiles at the read level, in ``cells`` order."""
        aug = self.augmentation
        if aug.rotations % 4 == 0 and not aug.flip:
            for batch in self.stream:
                yield batch.pixels
            return
        # a rotated grid reorders the tiles: collect them all (the piece at the read
        # level), then hand them out in the new order, each tile turned as the grid
        everything = np.concatenate([b.pixels for b in self.stream])
        size = self.stream.batch_size
        for start in range(0, len(self.order), size):
            tiles = np.rot90(everything[self.order[start : start + size]], aug.rotations, (1, 2))
            yield np.ascontiguousarray(tiles[:, :, ::-1] if aug.flip else tiles)


def piece_tiles(
    slide: Slide,
    sample: PieceSample,
    level: int,
    *,
    chunk_tiles: int = 64,
    augmentation: Augmentation | None = None,
    workers: int | None = None,
    prefetch: int = 2,
) -> PieceTiles:
    """A piece's tiles, read at ``level`` by ``TileStream`` (stored tiles decoded once on
    a thread pool, ahead of the consumer), rotated and flipped as ``augmentation`` says.

    Batches hold at most ``chunk_tiles`` tiles and nearly equal numbers of them: no tiny
    last batch, whose batch statistics would be poor (or undefined for one tile).

    Args:
        slide: the opened slide.
        sample: the piece.
        level: the pyramid level to read at.
        chunk_tiles: most tiles per batch.
        augmentation: quarter turns and flip of the grid and its tiles.
        workers: decoding threads (None: the cores this process may use).
        prefetch: batches decoded ahead of the consumer.
    """
    augmentation = augmentation or Augmentation()
    grid = sample.grid
    order, cells, shape = _rotate_grid(grid.in_tissue, augmentation)
    rows, cols = np.nonzero(grid.in_tissue)
    x0, y0 = grid.origin
    t = grid.tile_size
    boxes = np.stack(
        [x0 + cols * t, y0 + rows * t, np.full(len(rows), t), np.full(len(rows), t)], 1
    ).astype(np.int64)
    batches = max(1, math.ceil(len(boxes) / max(1, chunk_tiles)))
    stream = TileStream(
        slide,
        level,
        boxes,
        batch_size=max(1, math.ceil(len(boxes) / batches)),
        workers=workers,
        prefetch=prefetch,
    )
    return PieceTiles(stream, cells, shape, augmentation, order)


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
    with TileStream(slide, level, boxes, batch_size=min(len(boxes), 16)) as stream:
        for batch in stream:
            for i, pixels in zip(batch.indices, batch.pixels, strict=True):
                if pixels.ndim == 2:
                    pixels = np.repeat(pixels[..., None], 3, axis=2)
                out[i] = _resize_uint8(pixels[..., :3], (size, size))
    return out


def _resize_uint8(pixels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(h, w, 3) uint8 resized to ``shape``: bilinear, with a Gaussian prefilter when
    shrinking (scikit-image's antialiasing)."""
    if pixels.shape[:2] == tuple(shape):
        return np.ascontiguousarray(pixels)
    out = resize(
        pixels, (*shape, pixels.shape[2]), order=1, anti_aliasing=True, preserve_range=True
    )
    return np.clip(np.round(out), 0, 255).astype(np.uint8)
