"""Deterministic synthetic whole-slide images: a "needle in a haystack" benchmark."""

from __future__ import annotations

from .writer import (
    SYNTHETIC_CLASSES,
    SyntheticSlide,
    read_sidecar,
    sample_slide,
    sidecar_path,
    tissue_mask_truth,
    write_synthetic_slide,
)

__all__ = [
    "SYNTHETIC_CLASSES",
    "SyntheticSlide",
    "read_sidecar",
    "sample_slide",
    "sidecar_path",
    "tissue_mask_truth",
    "write_synthetic_slide",
]
