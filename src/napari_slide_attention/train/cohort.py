"""Cohort manifests: which slides, their labels, and which split each belongs to.

A cohort is a CSV file with a header row. Columns:

``slide``   path of the slide file (relative paths are relative to the CSV's folder)
``label``   class name of the slide
``split``   ``train``, ``val`` or ``test``
``case``    optional case (patient) id; all slides of a case must be in one split
``lesions`` optional lesion boxes: a JSON list of ``{"class": name, "box": [x, y, w, h]}``
            in level-0 px, or ``sidecar`` to read them from the synthetic slide's
            ``.json`` sidecar

The class names come from ``--classes`` (lowest to highest risk) or, failing that, from
the order they first appear in; keeping the label set explicit is better.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..files import atomic_write_text, written_atomically
from ..slide.boxes import Box

__all__ = ["SPLITS", "Cohort", "CohortEntry", "CohortError", "read_cohort", "write_cohort"]

SPLITS = ("train", "val", "test")
_REQUIRED = ("slide", "label", "split")


class CohortError(ValueError):
    """A cohort file cannot be used; the message names the file, the line and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str, line: int | None = None):
        where = f"{path}" + (f", line {line}" if line is not None else "")
        super().__init__(f"{where}: {problem}")
        self.path = str(path)
        self.line = line
        self.problem = problem


@dataclass
class CohortEntry:
    """One slide of a cohort.

    Attributes:
        slide: path of the slide file.
        label: class index.
        split: "train", "val" or "test".
        case: case id ("" when not given: each slide is its own case).
        lesions: (level-0 box, class index) of known lesions; None when not given.
        mpp: µm per level-0 pixel to read the slide with, overriding its own (for slides
            whose files lack it); None = the file's.
    """

    slide: Path
    label: int
    split: str
    case: str = ""
    lesions: list[tuple[Box, int]] | None = None
    mpp: float | None = None


@dataclass
class Cohort:
    """The slides of a study with their classes.

    Attributes:
        classes: class names from lowest to highest risk.
        entries: the slides.
        path: the CSV it was read from, if any.
    """

    classes: tuple[str, ...]
    entries: list[CohortEntry] = field(default_factory=list)
    path: Path | None = None

    def split(self, name: str) -> list[CohortEntry]:
        """The entries of one split."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return [e for e in self.entries if e.split == name]

    def __iter__(self) -> Iterator[CohortEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def with_mpp(self, mpp: float | None) -> Cohort:
        """The cohort with every slide read at ``mpp`` µm per pixel (``--mpp``); None
        leaves it as it is.

        Raises:
            ValueError: ``mpp`` is not a positive number.
        """
        if mpp is None:
            return self
        if not 0 < float(mpp) < float("inf"):
            raise ValueError(f"--mpp must be a positive number of µm per pixel, got {mpp}")
        entries = [replace(e, mpp=float(mpp)) for e in self.entries]
        return replace(self, entries=entries)

    def counts(self) -> dict[str, dict[str, int]]:
        """Slides per split and class."""
        out: dict[str, dict[str, int]] = {s: dict.fromkeys(self.classes, 0) for s in SPLITS}
        for e in self.entries:
            out[e.split][self.classes[e.label]] += 1
        return out


def _parse_lesions(
    text: str, slide: Path, classes: Sequence[str], path: Path, line: int
) -> list[tuple[Box, int]] | None:
    text = text.strip()
    if not text:
        return None
    if text == "sidecar":
        from ..slide.synthetic import read_sidecar

        try:
            info = read_sidecar(slide)
        except (OSError, ValueError) as exc:
            raise CohortError(
                path, f"cannot read the lesion sidecar of {slide}: {exc}", line
            ) from exc
        items = info.get("lesions", [])
    else:
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CohortError(path, f"lesions are not valid JSON ({exc.msg})", line) from exc
    lesions = []
    for item in items:
        try:
            name = item["class"]
            box = tuple(int(v) for v in item["box"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CohortError(
                path, f"a lesion needs a class and a box [x, y, w, h], got {item!r}", line
            ) from exc
        if name not in classes:
            raise CohortError(path, f"lesion class {name!r} is not one of {list(classes)}", line)
        if len(box) != 4 or box[2] <= 0 or box[3] <= 0:
            raise CohortError(path, f"lesion box {list(box)} is not [x, y, w, h]", line)
        lesions.append((box, classes.index(name)))
    return lesions


def read_cohort(
    path: str | os.PathLike, classes: Sequence[str] | None = None, *, check_files: bool = True
) -> Cohort:
    """The cohort in a CSV manifest.

    Args:
        path: the CSV file.
        classes: class names from lowest to highest risk; None = in order of appearance.
        check_files: fail when a slide file does not exist.

    Raises:
        CohortError: naming the file, the line and the problem.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise CohortError(path, "no such cohort file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CohortError(path, f"cannot read the cohort file ({exc})") from exc
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in _REQUIRED if c not in header]
    if missing:
        raise CohortError(
            path,
            f"missing column(s) {', '.join(missing)}; the header must name "
            "slide,label,split[,case][,lesions][,mpp]",
            1,
        )
    rows = []
    for line, row in enumerate(reader, start=2):
        if None in row:  # more fields than the header names
            raise CohortError(
                path,
                f"{len(header) + len(row[None])} fields for {len(header)} columns (a JSON "
                'lesions value must be quoted: "[{""class"": ...}]")',
                line,
            )
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        if not any(row.values()):
            continue
        rows.append((line, row))
    if not rows:
        raise CohortError(path, "the cohort lists no slides")
    names = list(classes) if classes else []
    if not names:
        for _, row in rows:
            if row["label"] and row["label"] not in names:
                names.append(row["label"])
    if len(names) < 2:
        raise CohortError(path, f"a classifier needs at least 2 classes, found {names}")
    entries = []
    seen: dict[Path, int] = {}
    for line, row in rows:
        slide = Path(row["slide"])
        if not row["slide"]:
            raise CohortError(path, "empty slide path", line)
        if not slide.is_absolute():
            slide = (path.parent / slide).resolve()
        if check_files and not slide.exists():
            raise CohortError(path, f"slide {slide} does not exist", line)
        if slide in seen:
            raise CohortError(path, f"slide {slide} is listed twice (line {seen[slide]})", line)
        seen[slide] = line
        if row["label"] not in names:
            raise CohortError(path, f"label {row['label']!r} is not one of {names}", line)
        split = row["split"].lower()
        if split in ("validation", "valid"):
            split = "val"
        if split not in SPLITS:
            raise CohortError(
                path, f"split {row['split']!r} is not one of {', '.join(SPLITS)}", line
            )
        lesions = _parse_lesions(row.get("lesions", ""), slide, names, path, line)
        mpp = None
        if row.get("mpp"):
            try:
                mpp = float(row["mpp"])
            except ValueError:
                mpp = -1.0
            if not 0 < mpp < float("inf"):
                raise CohortError(
                    path, f"mpp {row['mpp']!r} is not a positive number of µm per pixel", line
                )
        entries.append(
            CohortEntry(slide, names.index(row["label"]), split, row.get("case", ""), lesions, mpp)
        )
    cases: dict[str, str] = {}
    for e in entries:
        if e.case and cases.setdefault(e.case, e.split) != e.split:
            raise CohortError(
                path,
                f"case {e.case!r} has slides in both {cases[e.case]!r} and {e.split!r}; "
                "all slides of a case must be in one split",
            )
    return Cohort(tuple(names), entries, path)


def write_cohort(path: str | os.PathLike, cohort: Cohort) -> Path:
    """Write a cohort manifest (slide paths relative to the file when possible)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with written_atomically(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        with_mpp = any(e.mpp is not None for e in cohort.entries)
        writer.writerow(["slide", "label", "split", "case", "lesions"] + ["mpp"] * with_mpp)
        for e in cohort.entries:
            try:
                slide = os.path.relpath(e.slide, path.parent)
            except ValueError:  # another drive on Windows
                slide = str(e.slide)
            lesions = (
                json.dumps([{"class": cohort.classes[c], "box": list(b)} for b, c in e.lesions])
                if e.lesions is not None
                else ""
            )
            mpp = [repr(e.mpp) if e.mpp is not None else ""] * with_mpp
            writer.writerow([slide, cohort.classes[e.label], e.split, e.case, lesions, *mpp])
    return path


def make_synthetic_cohort(
    directory: str | os.PathLike,
    *,
    slides_per_class: dict[str, int] | None = None,
    size: tuple[int, int] = (3072, 2048),
    seed: int = 0,
    lesion_size: int = 100,
    classes: Sequence[str] | None = None,
    n_pieces: int | None = None,
    stain: str = "he",
) -> Cohort:
    """Write a cohort of synthetic slides and its ``cohort.csv``.

    Every class gets ``slides_per_class[split]`` slides per split; slide seeds follow from
    ``seed``, so the same arguments give the same cohort. Lesion boxes come from the
    sidecars (``lesions`` column = ``sidecar``; on IHC slides the tumour regions, of the
    slide's class). Existing slides written with the same settings are kept.

    The generator's settings (stain, classes, size, seed, lesion size, pieces and, for IHC,
    the fixed :data:`~napari_slide_attention.slide.synthetic.IHC_SETTINGS`) are written to
    ``synthetic-cohort.json`` before the first slide, so a benchmark can show they were
    fixed before any model ran; a folder whose record names other settings is refused
    rather than mixed.

    Args:
        directory: The cohort folder.
        slides_per_class: Slides per class for each split (default train 4, val 2, test 2).
        size: Level-0 (width, height) of every slide.
        seed: Seed of the cohort; slide ``k`` gets ``seed * 100003 + k``.
        lesion_size: H&E: lesion side in level-0 px.
        classes: H&E: class names, lowest to highest risk; an IHC stain's are fixed.
        n_pieces: Tissue pieces per slide (default 1-3, from each slide's seed).
        stain: ``"he"`` (needle slides), ``"her2"`` or ``"mmr"`` (IHC slides).

    Returns:
        The cohort (read back from the written CSV).

    Raises:
        ValueError: An unknown stain, classes that do not fit it, or a folder made with
            other settings.
    """
    import warnings

    from ..slide.synthetic import IHC_SETTINGS, read_sidecar, stain_classes, write_synthetic_slide
    from ..slide.synthetic.ihc import check_stain
    from ..slide.synthetic.truth import GENERATOR

    stain = check_stain(stain)
    directory = Path(directory)
    if stain == "he":
        classes = tuple(classes or stain_classes("he"))
    else:
        if classes is not None and tuple(classes) != stain_classes(stain):
            raise ValueError(f"a {stain} cohort's classes are fixed: {list(stain_classes(stain))}")
        classes = stain_classes(stain)
    per = slides_per_class or {"train": 4, "val": 2, "test": 2}
    settings: dict[str, object] = {
        "generator": GENERATOR,
        "stain": stain,
        "classes": list(classes),
        "size": [int(v) for v in size],
        "seed": int(seed),
        "slide_seeds": "seed * 100003 + k, k = 1, 2, ... in the order of the CSV",
        "n_pieces": n_pieces,
    }
    if stain == "he":
        settings["lesion_size"] = int(lesion_size)
    else:
        settings["ihc_settings"] = IHC_SETTINGS
    _record_settings(directory, settings, per)
    rows = []
    counter = 0
    for split in SPLITS:
        for k, name in enumerate(classes):
            for i in range(per.get(split, 0)):
                counter += 1
                slide_seed = seed * 100003 + counter
                path = directory / f"{split}-{k}-{name}-{i:03d}.tif"
                if not _is_current(path, read_sidecar, stain, name, slide_seed, size):
                    kwargs: dict[str, object] = {} if n_pieces is None else {"n_pieces": n_pieces}
                    if stain == "he":
                        kwargs.update(classes=classes, lesion_size=lesion_size)
                    else:
                        kwargs["stain"] = stain
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", UserWarning)
                        write_synthetic_slide(
                            path, size=size, label=name, seed=slide_seed, **kwargs
                        )
                rows.append((path.name, name, split, f"case-{counter:04d}"))
    csv_path = directory / "cohort.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide", "label", "split", "case", "lesions"])
        for name, label, split, case in rows:
            writer.writerow([name, label, split, case, "sidecar"])
    return read_cohort(csv_path, classes)


SYNTHETIC_SETTINGS = "synthetic-cohort.json"
"""The file in a synthetic cohort's folder that records how its slides were made."""


def _record_settings(directory: Path, settings: dict, per: dict[str, int]) -> None:
    """Write the generator settings, or refuse a folder whose record names others."""
    record = directory / SYNTHETIC_SETTINGS
    if record.exists():
        try:
            old = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{record}: cannot read the cohort's settings ({exc})") from exc
        changed = sorted(k for k in settings if old.get(k) != settings[k])
        if changed:
            raise ValueError(
                f"{directory} holds a synthetic cohort made with other settings "
                f"({', '.join(changed)} differ); use another folder"
            )
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        record, json.dumps({**settings, "slides_per_class": dict(per)}, indent=2) + "\n"
    )


def _is_current(path: Path, read_sidecar, stain: str, label: str, seed: int, size) -> bool:
    """Whether ``path`` is a finished slide of this stain, label, seed and size."""
    if not path.exists():
        return False
    try:
        info = read_sidecar(path)
    except (OSError, ValueError):
        return False
    return (
        info.get("stain", "he") == stain
        and info.get("label") == label
        and info.get("seed") == seed
        and info.get("size") == [int(v) for v in size]
    )
