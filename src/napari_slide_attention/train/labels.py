"""The label store's corrections applied to a training cohort: ``apply_labels``.

A reviewer's slide label replaces the cohort's label of that slide, and their regions (of
the cohort's classes) replace its lesion boxes; ``train --labels`` (and so the GUI's
fine-tuning) trains on the cohort this gives. The bridge lives in ``train`` because
``labels`` never imports training code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..labels import LabelStore, slide_key
from .cohort import Cohort

__all__ = ["LabelsApplied", "apply_labels", "apply_labels_with_summary"]


@dataclass(frozen=True)
class LabelsApplied:
    """What ``apply_labels_with_summary`` took from a store.

    Attributes:
        slide_labels: cohort slides whose label came from the store.
        changed: of those, how many differ from the cohort's own label.
        regions: regions that became lesion boxes.
        slides_with_regions: cohort slides whose lesions the regions replaced.
        ignored_regions: live regions of cohort slides whose label is not a cohort class.
        not_in_cohort: slides with a label or live regions in the store but not in the
            cohort (moved slides, another cohort).
    """

    slide_labels: int = 0
    changed: int = 0
    regions: int = 0
    slides_with_regions: int = 0
    ignored_regions: int = 0
    not_in_cohort: int = 0

    def summary(self) -> str:
        """One readable line."""
        text = (
            f"{self.slide_labels} slide label(s) ({self.changed} differ from the cohort's), "
            f"{self.regions} region(s) on {self.slides_with_regions} slide(s)"
        )
        if self.ignored_regions:
            text += f"; {self.ignored_regions} region(s) of other classes ignored"
        if self.not_in_cohort:
            text += f"; {self.not_in_cohort} labelled slide(s) are not in the cohort"
        return text


def apply_labels_with_summary(cohort: Cohort, store: LabelStore) -> tuple[Cohort, LabelsApplied]:
    """The cohort with the store's labels (see ``apply_labels``) and what was applied."""
    classes = list(cohort.classes)
    labels = store.slide_labels()
    entries = []
    counts = dict.fromkeys(
        ("slide_labels", "changed", "regions", "slides_with_regions", "ignored_regions"), 0
    )
    for entry in cohort.entries:
        key = slide_key(entry.slide)
        changes: dict[str, Any] = {}
        if key in labels:
            name = labels[key].label
            if name not in classes:
                raise ValueError(
                    f"{store.path}: slide {key} is labelled {name!r}, which is not one of the "
                    f"cohort's classes {classes}"
                )
            changes["label"] = classes.index(name)
            counts["slide_labels"] += 1
            counts["changed"] += changes["label"] != entry.label
        regions = store.regions(key)
        lesions = [(r.box, classes.index(r.label)) for r in regions if r.label in classes]
        counts["ignored_regions"] += len(regions) - len(lesions)
        if lesions:
            # the annotator's regions are the corrected truth: they replace the cohort's boxes
            changes["lesions"] = lesions
            counts["regions"] += len(lesions)
            counts["slides_with_regions"] += 1
        entries.append(dataclasses.replace(entry, **changes) if changes else entry)
    labelled = set(labels) | set(store.regions_by_slide())
    not_in_cohort = len(labelled - {slide_key(e.slide) for e in cohort.entries})
    applied = LabelsApplied(**counts, not_in_cohort=not_in_cohort)
    return Cohort(cohort.classes, entries, cohort.path), applied


def apply_labels(cohort: Cohort, store: LabelStore) -> Cohort:
    """A new cohort with the store's labels in place of the cohort's.

    Each slide with a slide label in the store takes it; each slide with live regions
    whose label is one of the cohort's classes gets those regions' bounding boxes (with
    their class indices) as its lesions, in place of the cohort's own boxes: the
    annotator's regions are the corrected truth. Slides the store does not know stay as
    they are; the classes and the path are kept.

    Raises:
        ValueError: a slide label that is not one of the cohort's classes (naming the
            slide, the label and the classes).
    """
    return apply_labels_with_summary(cohort, store)[0]
