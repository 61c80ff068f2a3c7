"""Synthetic IHC slides (HER2, MMR): the stains, their classes, the fixed settings, and the
truth written to the sidecar (placement: :mod:`.ihc_layout`, pixels: :mod:`.ihc_rendering`).

An IHC slide is haematoxylin-counterstained tissue (blue nuclei, pale blue-grey stroma)
with DAB (brown) where the antibody binds. Invasive tumour regions, 10-30 % of the tissue,
lie among stroma and normal ducts; every tumour cell shows the slide's class:

* HER2 (membrane): the share of tumour cells with stained membranes, how strong and how
  complete the staining is, as in the HER2 contest's criteria (Qaiser et al. 2018):
  0 = none, or faint in < 10 % of tumour cells; 1+ = faint, incomplete membranes;
  2+ = weak to moderate complete membranes in > 10 %; 3+ = strong complete membranes
  in > 10 %.
* MMR (nuclear): tumour nuclei DAB kept (``intact``) or lost (``loss``); normal nuclei
  (ducts, stroma, lymphocytes) are stained on both, the internal control pathologists
  compare against.

Distractors that fool an attention drawn to dark or brown pixels are laid out from the
seed alone, never from the label, so every class has them in the same measure: DAB blush
in the stroma, DAB-stained normal ducts, tissue folds, pen marks, dark blood-filled
vessels, and ragged tissue edges with the DAB edge effect.

Everything here is fixed (:data:`IHC_SETTINGS`): a cohort's settings are chosen before any
model runs and recorded with it, never tuned to favour one model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .truth import SYNTHETIC_CLASSES

STAINS: tuple[str, ...] = ("he", "her2", "mmr")
"""Stains of synthetic slides: H&E needle slides, HER2 and MMR immunohistochemistry."""

HER2_CLASSES: tuple[str, ...] = ("0", "1+", "2+", "3+")
"""HER2 scores, lowest to highest."""

MMR_CLASSES: tuple[str, ...] = ("intact", "loss")
"""MMR protein expression of the tumour nuclei; loss is the finding."""

ARTEFACT_KINDS: tuple[str, ...] = ("dab_stroma", "dab_duct", "fold", "pen", "vessel")
"""Kinds of distractor with a box in the sidecar."""

# HER2 tumour cells fall in populations: (share of the tumour cells, membrane DAB in optical
# density units, share of the membrane stained). The rest of the cells are unstained.
_HER2_MEMBRANES: dict[str, tuple[tuple[float, float, float], ...]] = {
    "0": ((0.05, 0.20, 0.35),),  # faint, incomplete, in < 10 % of the cells
    "1+": ((0.60, 0.30, 0.45),),  # faint, incomplete, in > 10 %
    "2+": ((0.60, 0.75, 1.0), (0.25, 0.28, 0.45)),  # weak-moderate, complete, in > 10 %
    "3+": ((0.85, 1.70, 1.0), (0.10, 0.75, 1.0)),  # strong, complete, in > 10 %
}
# Membrane thickness: strong staining looks thicker at the microscope.
_HER2_MEMBRANE_UM = {"0": 1.3, "1+": 1.3, "2+": 1.7, "3+": 3.2}
# MMR tumour nuclei: (share positive, nuclear DAB). Normal nuclei are stained on both.
_MMR_TUMOUR_NUCLEI = {"intact": (0.92, 1.25), "loss": (0.0, 0.0)}
_MMR_NORMAL_NUCLEI = (0.9, 1.1)

TUMOUR_SHARE = (0.13, 0.27)
"""Range the tumour's share of the tissue is drawn from (each slide its own)."""

# Distractors per mm^2 of tissue (at least one of each kind on every slide).
ARTEFACTS_PER_MM2 = {"dab_stroma": 0.5, "dab_duct": 0.8, "fold": 0.2, "pen": 0.1, "vessel": 1.2}
# Sizes in µm: (low, high) of the long radius, or of (length, width) for folds and pens.
SIZES_UM = {
    "vessel": (30.0, 80.0),
    "dab_stroma": (60.0, 140.0),
    "dab_duct": (30.0, 50.0),
    "duct": (25.0, 45.0),
    "fold_length": (400.0, 1000.0),
    "fold_width": (40.0, 90.0),
    "pen_radius": (300.0, 800.0),
    "pen_width": (50.0, 110.0),
}
DUCT_SPACING_UM = 140.0  # one normal duct at most per lattice square this wide
DUCT_PRESENCE = 0.5
MARGIN_UM = 30.0  # stroma kept between the tumour and a distractor or a duct

IHC_SETTINGS: dict[str, Any] = {
    "version": 1,
    "tumour_share": list(TUMOUR_SHARE),
    "tumour_cell_um": 15.0,
    "tumour_nucleus_um": 9.0,
    "normal_cell_um": 9.0,
    "her2_membranes": {k: [list(p) for p in v] for k, v in _HER2_MEMBRANES.items()},
    "her2_membrane_um": dict(_HER2_MEMBRANE_UM),
    "mmr_tumour_nuclei": {k: list(v) for k, v in _MMR_TUMOUR_NUCLEI.items()},
    "mmr_normal_nuclei": list(_MMR_NORMAL_NUCLEI),
    "dab_jitter": [0.9, 1.1],
    "artefacts_per_mm2": dict(ARTEFACTS_PER_MM2),
    "sizes_um": {k: list(v) for k, v in SIZES_UM.items()},
    "duct_spacing_um": DUCT_SPACING_UM,
    "duct_presence": DUCT_PRESENCE,
    "margin_um": MARGIN_UM,
}
"""The fixed settings of every IHC slide (recorded in sidecars and synthetic cohorts)."""


def check_stain(stain: Any) -> str:
    """The stain name, checked: one of :data:`STAINS`."""
    if not isinstance(stain, str) or stain.lower() not in STAINS:
        raise ValueError(f"unknown stain {stain!r}; expected one of {', '.join(STAINS)}")
    return stain.lower()


def stain_classes(stain: str) -> tuple[str, ...]:
    """The class names of a stain, lowest to highest."""
    return {"he": SYNTHETIC_CLASSES, "her2": HER2_CLASSES, "mmr": MMR_CLASSES}[check_stain(stain)]


def staining(stain: str, label: str, seed: int) -> dict[str, Any]:
    """The slide's staining: its class's fixed values, DAB and counterstain strength drawn
    within ±10 % from the seed (the same draw for every class)."""
    rng = np.random.default_rng([seed, 0xDAB])
    dab, counter = (float(v) for v in rng.uniform(*IHC_SETTINGS["dab_jitter"], size=2))
    out: dict[str, Any] = {"dab_strength": dab, "counterstain_strength": counter}
    if stain == "her2":
        out["membranes"] = [list(p) for p in _HER2_MEMBRANES[label]]
        out["membrane_um"] = _HER2_MEMBRANE_UM[label]
        out["normal_nuclei"] = [0.0, 0.0]
        out["tumour_nuclei"] = [0.0, 0.0]
    else:
        out["membranes"] = []
        out["membrane_um"] = 1.2
        out["tumour_nuclei"] = list(_MMR_TUMOUR_NUCLEI[label])
        out["normal_nuclei"] = list(_MMR_NORMAL_NUCLEI)
    return out


def ihc_truth(
    stain: str,
    layout: dict[str, Any],
    stats: dict[str, Any],
    classes: tuple[str, ...],
    label_index: int,
    stain_info: dict[str, Any],
) -> dict[str, Any]:
    """The IHC part of a slide's sidecar, from its layout and what the renderer counted.

    The tumour regions are also the sidecar's ``lesions``, of the slide's class, so a
    cohort's ``lesions`` column (``sidecar``) gives the tumour: every tile on it shows the
    slide's class, and tissue off it takes the lowest class (no HER2 staining; MMR intact).
    """
    label = classes[label_index]
    tumours = []
    for region, (x0, y0, x1, y1) in zip(layout["tumours"], stats["tumour_bounds"], strict=True):
        if x1 < 0:
            continue  # (a region that missed the tissue altogether)
        tumours.append(
            {
                "class": label,
                "class_index": label_index,
                "box": [x0, y0, x1 - x0 + 1, y1 - y0 + 1],
                "shape": region,
            }
        )
    share = stats["tumour_px"] / stats["tissue_px"] if stats["tissue_px"] else 0.0
    return {
        "stain": stain,
        "lesions": tumours,
        "tumour_boxes": [t["box"] for t in tumours],
        "tumour_fraction": share,
        "lesion_fraction": share,
        "artefact_boxes": [
            {"kind": a["kind"], "box": list(a["box"]), "shape": a["shape"]}
            for a in layout["artefacts"]
        ],
        "staining": stain_info,
        "ihc_settings": IHC_SETTINGS,
    }
