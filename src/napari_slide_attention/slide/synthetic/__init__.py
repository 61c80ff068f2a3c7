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

``stain="her2"`` or ``"mmr"`` writes immunohistochemistry slides instead (:mod:`.ihc`):
haematoxylin and DAB, invasive tumour over 10-30 % of the tissue whose staining sets the
class, and distractors in every class alike; :func:`tumour_mask_truth` and
:func:`artefact_mask_truth` render their tumour and distractor masks.
"""

from __future__ import annotations

from .ihc import ARTEFACT_KINDS, HER2_CLASSES, IHC_SETTINGS, MMR_CLASSES, STAINS, stain_classes
from .truth import (
    SYNTHETIC_CLASSES,
    SyntheticSlide,
    artefact_mask_truth,
    read_sidecar,
    sidecar_path,
    tissue_mask_truth,
    tumour_mask_truth,
)
from .writer import sample_slide, write_synthetic_slide

__all__ = [
    "ARTEFACT_KINDS",
    "HER2_CLASSES",
    "IHC_SETTINGS",
    "MMR_CLASSES",
    "STAINS",
    "SYNTHETIC_CLASSES",
    "SyntheticSlide",
    "artefact_mask_truth",
    "read_sidecar",
    "sample_slide",
    "sidecar_path",
    "stain_classes",
    "tissue_mask_truth",
    "tumour_mask_truth",
    "write_synthetic_slide",
]
