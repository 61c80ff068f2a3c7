"""Deterministic synthetic whole-slide images: a "needle in a haystack" benchmark.

A synthetic slide is a pyramidal, JPEG-tiled RGB TIFF that looks, from afar, like an H&E
stained section: a near-white background, one to three tissue pieces with a pink stroma and
purple nuclei, and a few small lesions whose colour and nuclear pattern encode a class. The
lesions cover a tiny share of the tissue, so a slide-level classifier has to find them, which
is what attention-based multiple-instance learning is for.

Everything is a pure function of the arguments (seed included), so the same call writes
byte-identical files. Tiles are rendered procedurally, one at a time, at the scale of the
level being written, so memory stays bounded by a few tiles whatever the slide size.

A JSON sidecar next to the slide (``slide.tif`` -> ``slide.tif.json``) holds the ground
truth: label, tissue piece boxes, lesion boxes and classes. :func:`tissue_mask_truth`
renders the exact tissue mask with the same shape function as the renderer.
"""

from __future__ import annotations

from .truth import (
    SYNTHETIC_CLASSES,
    SyntheticSlide,
    read_sidecar,
    sidecar_path,
    tissue_mask_truth,
)
from .writer import sample_slide, write_synthetic_slide

__all__ = [
    "SYNTHETIC_CLASSES",
    "SyntheticSlide",
    "read_sidecar",
    "sample_slide",
    "sidecar_path",
    "tissue_mask_truth",
    "write_synthetic_slide",
]
