"""The label store of a cohort: slide labels, region labels and notes, with their history."""

from __future__ import annotations

from .store import (
    REGION_KINDS,
    SCHEMA_VERSION,
    STATUSES,
    UNCLASSIFIED,
    Change,
    LabelsApplied,
    LabelStore,
    LabelStoreError,
    Region,
    RegionNotFoundError,
    SlideLabel,
    apply_labels,
    apply_labels_with_summary,
    slide_key,
)

__all__ = [
    "REGION_KINDS",
    "SCHEMA_VERSION",
    "STATUSES",
    "UNCLASSIFIED",
    "Change",
    "LabelStore",
    "LabelStoreError",
    "LabelsApplied",
    "Region",
    "RegionNotFoundError",
    "SlideLabel",
    "apply_labels",
    "apply_labels_with_summary",
    "slide_key",
]
