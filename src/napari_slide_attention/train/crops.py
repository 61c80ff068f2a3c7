"""The sliding-window baseline's training crops: where they come from (lesion boxes and
lesion-free tissue tiles of each slide), one epoch's draw of them (jittered around each
lesion, rotated and flipped), and reading them in batches through the one tile reader
(``TileStream``), the next batch while the model works on this one.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..jobs import Progress
from ..slide.boxes import Box, overlapping
from ..slide.reader import Slide, open_slide
from ..slide.sampling import PieceSample, read_level_for, slide_pieces, tile_edge_px
from ..slide.stream import TileStream
from ..slide.tissue import TissueParams, tissue_mask
from .cohort import Cohort

if TYPE_CHECKING:
    from ..models.sliding_window import CropClassifier
    from .sliding_window import SlidingWindowSettings

__all__ = [
    "Crop",
    "CropSource",
    "OpenSlides",
    "check_lesions",
    "crop_batches",
    "draw_crops",
    "expected_counts",
    "lesion_free",
    "prepare_sources",
    "prepared",
    "read_crops",
    "sample_tiles",
]

# Open slides kept while reading an epoch's crops (file handles and decoder caches).
_OPEN_SLIDES = 8


@dataclass
class CropSource:
    """A slide's crops: lesion boxes, lesion-free tissue tiles and how to read them."""

    slide: str
    label: int
    level: int
    tile_px: int
    lesions: list[tuple[Box, int]]
    negatives: np.ndarray  # (n, 2) level-0 (x, y) of lesion-free tissue tiles
    pieces: list[PieceSample] = field(default_factory=list, repr=False)
    mpp: float | None = None  # the cohort's override of the slide's pixel size


@dataclass(frozen=True)
class Crop:
    source: int
    x: int
    y: int
    label: int
    rotations: int = 0
    flip: bool = False


def check_lesions(cohort: Cohort, splits: Sequence[str], risk: Sequence[int]) -> None:
    """Raise before any slide is opened when a slide above the lowest risk lacks boxes."""
    for entry in cohort.entries:
        if entry.split in splits and entry.label != risk[0] and not entry.lesions:
            given = "no lesion boxes" if entry.lesions is None else "an empty list of lesions"
            raise ValueError(
                f"{entry.slide}: a {cohort.classes[entry.label]!r} slide of the "
                f"{entry.split!r} split has {given}; the sliding-window baseline trains on "
                "crops around lesions, so give their boxes in the cohort's lesions column "
                '(a JSON list of {"class", "box"}, or \'sidecar\')'
            )


def lesion_free(boxes: np.ndarray, lesions: Sequence[tuple[Box, int]]) -> np.ndarray:
    """(n,) bool: which (x, y, w, h) boxes overlap no lesion box."""
    return ~overlapping(boxes, [box for box, _ in lesions])


def prepare_sources(
    cohort: Cohort,
    split: str,
    settings: SlidingWindowSettings,
    tissue: TissueParams | None,
) -> Generator[Progress, None, list[CropSource]]:
    """The crop sources of a split's slides (slides with neither lesions nor tissue left out)."""
    entries = cohort.split(split)
    out = []
    for n, entry in enumerate(entries):
        with open_slide(entry.slide, mpp=entry.mpp) as slide:
            tile_px = tile_edge_px(slide, settings.model["crop_um"])
            level = read_level_for(slide, tile_px, settings.model["input_px"])
            mask = tissue_mask(slide, tissue)
            pieces = slide_pieces(slide, tile_px, min_tissue=settings.min_tissue, mask=mask)
        lesions = list(entry.lesions or [])
        boxes = (
            np.concatenate([p.grid.boxes() for p in pieces])
            if pieces
            else np.zeros((0, 4), np.int64)
        )  # (n, 4) level-0 (x, y, w, h) of the tissue tiles
        negatives = boxes[lesion_free(boxes, lesions), :2]
        if not lesions and not len(negatives):
            yield Progress(
                "prepare", n + 1, len(entries), f"{split}: {entry.slide.name}: no tissue, skipped"
            )
            continue
        out.append(
            CropSource(
                str(entry.slide),
                entry.label,
                level,
                tile_px,
                lesions,
                negatives,
                pieces,
                entry.mpp,
            )
        )
        yield Progress(
            "prepare",
            n + 1,
            len(entries),
            f"{split}: {entry.slide.name}: {len(lesions)} lesion(s), {len(negatives)} "
            "lesion-free tissue tiles",
        )
    return out


def draw_crops(
    sources: Sequence[CropSource],
    settings: SlidingWindowSettings,
    rng: np.random.Generator,
    lowest: int,
    augment: bool,
) -> list[Crop]:
    """One epoch's crops, shuffled: jittered crops around each lesion and negatives."""
    crops = []
    for s, src in enumerate(sources):
        half = src.tile_px / 2
        for (x, y, w, h), cls in src.lesions:
            for _ in range(settings.crops_per_lesion):
                cx, cy = x + rng.uniform(0, w), y + rng.uniform(0, h)
                crops.append(Crop(s, round(cx - half), round(cy - half), int(cls)))
        n = min(settings.negatives_per_slide, len(src.negatives))
        if n:
            for i in rng.choice(len(src.negatives), n, replace=False):
                x, y = src.negatives[i]
                crops.append(Crop(s, int(x), int(y), lowest))
    ordered = [crops[i] for i in rng.permutation(len(crops))]
    if not augment:
        return ordered
    turns = rng.integers(4, size=len(ordered))
    flips = rng.integers(2, size=len(ordered))
    return [
        replace(c, rotations=int(t), flip=bool(f))
        for c, t, f in zip(ordered, turns, flips, strict=True)
    ]


def expected_counts(
    sources: Sequence[CropSource], settings: SlidingWindowSettings, n_classes: int, lowest: int
) -> np.ndarray:
    """(C,) crops per class in every epoch (the draw changes positions, not counts)."""
    counts = np.zeros(n_classes)
    for src in sources:
        for _, cls in src.lesions:
            counts[cls] += settings.crops_per_lesion
        counts[lowest] += min(settings.negatives_per_slide, len(src.negatives))
    return counts


class OpenSlides:
    """The most recently used slides, open (one reading thread at a time)."""

    def __init__(self, size: int = _OPEN_SLIDES):
        self.size = size
        self.slides: OrderedDict[str, Slide] = OrderedDict()

    def get(self, path: str, mpp: float | None = None) -> Slide:
        if path in self.slides:
            self.slides.move_to_end(path)
            return self.slides[path]
        if len(self.slides) >= self.size:
            _, old = self.slides.popitem(last=False)
            old.close()
        slide = self.slides[path] = open_slide(path, mpp=mpp)
        return slide

    def close(self) -> None:
        while self.slides:
            self.slides.popitem()[1].close()


def read_crops(
    crops: Sequence[Crop], sources: Sequence[CropSource], slides: OpenSlides
) -> list[np.ndarray]:
    """The crops' pixels at their slides' read levels, rotated and flipped as drawn; each
    slide's crops read in one ``TileStream`` pass."""
    out: list[np.ndarray | None] = [None] * len(crops)
    by_source: dict[int, list[int]] = {}
    for i, c in enumerate(crops):
        by_source.setdefault(c.source, []).append(i)
    for s, members in by_source.items():
        src = sources[s]
        boxes = [(crops[i].x, crops[i].y, src.tile_px, src.tile_px) for i in members]
        stream = TileStream(slides.get(src.slide, src.mpp), src.level, boxes, batch_size=len(boxes))
        with stream:
            for batch in stream:
                for k, pixels in zip(batch.indices, batch.pixels, strict=True):
                    c = crops[members[k]]
                    pixels = np.rot90(pixels[..., :3], c.rotations)
                    out[members[k]] = np.ascontiguousarray(pixels[:, ::-1] if c.flip else pixels)
    return out  # type: ignore[return-value]


def crop_batches(
    crops: list[Crop], sources: Sequence[CropSource], batch_size: int
) -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
    """(tiles, labels) per batch; the next batch is read while the model works on this one.

    A last batch of one crop joins the one before (batch-norm statistics need two).
    """
    bounds = [*range(0, len(crops), batch_size), len(crops)]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    spans = list(itertools.pairwise(bounds))
    slides = OpenSlides()

    def read(span: tuple[int, int]) -> tuple[list[np.ndarray], np.ndarray]:
        part = crops[span[0] : span[1]]
        return read_crops(part, sources, slides), np.array([c.label for c in part])

    try:
        with ThreadPoolExecutor(1, thread_name_prefix="crops") as pool:
            pending = pool.submit(read, spans[0]) if spans else None
            for i in range(len(spans)):
                batch = pending.result()
                pending = pool.submit(read, spans[i + 1]) if i + 1 < len(spans) else None
                yield batch
    finally:
        slides.close()


def prepared(model: CropClassifier, tiles: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """(N, 3, s, s) normalised input; crops of different sizes (slides of other pixel
    sizes) are resized one by one."""
    if len({t.shape for t in tiles}) == 1:
        batch = torch.from_numpy(np.ascontiguousarray(np.stack(tiles)))  # (N, h, w, 3)
        return model.prepare(batch.to(device))
    return torch.cat(
        [model.prepare(torch.from_numpy(np.ascontiguousarray(t))[None].to(device)) for t in tiles]
    )


def sample_tiles(sources: Sequence[CropSource], per_slide: int) -> Iterator[np.ndarray]:
    """Up to ``per_slide`` tissue tiles of each slide, spread over its lesion-free tiles
    (lesion boxes where it has none)."""
    for src in sources:
        if len(src.negatives):
            n = min(per_slide, len(src.negatives))
            picks = np.linspace(0, len(src.negatives) - 1, n).round().astype(np.int64)
            corners = [tuple(src.negatives[i]) for i in picks]
        else:
            corners = [(x, y) for (x, y, _, _), _ in src.lesions[:per_slide]]
        with open_slide(src.slide, mpp=src.mpp) as slide:
            for x, y in corners:
                pixels = slide.read_region(src.level, int(x), int(y), src.tile_px, src.tile_px)
                yield pixels[..., :3]
