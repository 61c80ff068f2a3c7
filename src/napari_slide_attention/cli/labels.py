"""Commands about a cohort's label store: ``labels export``, ``labels import``,
``labels show``."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["cmd_labels_export", "cmd_labels_import", "cmd_labels_show"]


def _existing_store(path: str):
    """The label store at ``path``, read-only: showing or exporting never creates,
    migrates or writes a store (a missing or empty file is an error, in one line)."""
    from ..labels import LabelStore

    return LabelStore(path, read_only=True)


def cmd_labels_export(args: argparse.Namespace) -> int:
    """Writes a label store's regions as GeoJSON or its labels as CSV; returns the status."""
    if args.slide and not args.geojson:
        raise ValueError("--slide works with --geojson only (the CSV has every slide)")
    with _existing_store(args.store) as store:
        if args.geojson:
            n = store.export_geojson(args.geojson, slide=args.slide)
            print(f"wrote {n} region(s) to {args.geojson}")
        else:
            n = store.export_csv(args.csv)
            print(f"wrote {n} row(s) (slide labels and regions) to {args.csv}")
    return 0


def cmd_labels_import(args: argparse.Namespace) -> int:
    """Adds the regions of a GeoJSON file to a label store; returns the exit status."""

    from ..labels import SCHEMA_VERSION, LabelStore
    from ..labels.exchange import read_geojson

    store_path = Path(args.store)
    # a file that is not GeoJSON is refused before a new store is made for it
    read_geojson(Path(args.geojson))
    with (
        LabelStore(store_path, author=args.author) as store,
        warnings.catch_warnings(record=True) as caught,
    ):
        if store.backup is not None:
            print(
                f"slide-attention: note: {store_path}: label store upgraded to schema "
                f"version {SCHEMA_VERSION}; the file as it was is kept as {store.backup}",
                file=sys.stderr,
            )
        warnings.simplefilter("always")
        n = store.import_geojson(args.geojson, args.slide)
    for warning in caught:
        print(f"slide-attention: warning: {warning.message}", file=sys.stderr)
    if not Path(args.slide).exists():
        print(
            f"slide-attention: warning: {args.slide} does not exist; the regions are kept "
            "under its path",
            file=sys.stderr,
        )
    print(f"{args.geojson}: {n} region(s) on {args.slide} in {store_path}")
    return 0


def _shorten(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Rows as aligned columns under a header."""
    cells = [[str(v) for v in header], *[[str(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _state_text(target: str, state: dict[str, Any] | None) -> str:
    """One change's old or new state in a few words."""
    if state is None:
        return "-"
    if target == "slide_label":
        return f"{state['label']} ({state['status']})"
    if target == "note":
        return repr(_shorten(state["text"], 30))
    return f"{state['label']} {state['kind']} ({len(state['geometry'])} vertices)"


def cmd_labels_show(args: argparse.Namespace) -> int:
    """Prints a label store's labels, regions and history as tables; returns the status."""

    from ..labels import slide_key

    with _existing_store(args.store) as store:
        base = store.path.resolve().parent

        def shown(key: str) -> str:
            # slides next to the store (the cohort's folder) read shorter relative to it
            path = Path(key)
            return path.relative_to(base).as_posix() if path.is_relative_to(base) else key

        lines = [f"{store.path}"]
        if args.slide:
            key = slide_key(args.slide)
            label = store.slide_label(key)
            lines.append(f"slide  {key}")
            lines.append(
                "label  "
                + (
                    f"{label.label} ({label.status} by {label.author}, {label.time[:19]})"
                    + (f": {label.note}" if label.note else "")
                    if label
                    else "-"
                )
            )
            lines.append(f"note   {store.note(key) or '-'}")
            regions = store.regions(key)
            lines.append(f"regions  {len(regions)}")
            if regions:
                rows = [
                    (
                        r.id,
                        r.kind,
                        r.label,
                        "{} {} {} {}".format(*r.box),
                        r.author,
                        r.time[:19],
                        _shorten(r.note, 30),
                    )
                    for r in regions
                ]
                header = ("id", "kind", "label", "box x y w h", "author", "time", "note")
                lines.append(_table(header, rows))
        else:
            labels = store.slide_labels()
            slides = store.slides()
            lines[0] += f": {len(slides)} slide(s) with labels, notes or regions"
            rows = []
            for key in slides:
                label = labels.get(key)
                rows.append(
                    (
                        shown(key),
                        label.label if label else "-",
                        label.status if label else "-",
                        len(store.regions(key)),
                        label.author if label else "-",
                        label.time[:19] if label else "-",
                        _shorten(store.note(key), 30),
                    )
                )
            if rows:
                header = ("slide", "label", "status", "regions", "author", "time", "note")
                lines.append(_table(header, rows))
        if args.history:
            changes = store.history(args.slide)
            lines.append(f"\nhistory: {len(changes)} change(s)")
            rows = [
                (
                    c.id,
                    c.time[:19],
                    c.author,
                    shown(c.slide),
                    c.target,
                    c.action + (f" #{c.undoes}" if c.undoes else ""),
                    _state_text(c.target, c.old),
                    _state_text(c.target, c.new),
                    f"undone by #{c.undone_by}" if c.undone_by else "",
                )
                for c in changes
            ]
            if rows:
                header = ("id", "time", "author", "slide", "target", "action", "old", "new", "")
                lines.append(_table(header, rows))
    print("\n".join(lines))
    return 0
