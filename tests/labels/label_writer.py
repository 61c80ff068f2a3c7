"""A reviewer at work, for the durability tests: relabels slides through ``LabelStore``
and prints one JSON line per change after its commit.

``python label_writer.py STORE SEED [AUTHOR]`` makes changes until it is killed. Change
number ``n`` (0-based) is drawn from ``SEED`` and ``n`` alone, and every change writes
exactly one history row, so a restarted writer continues from the number of changes the
store holds: the test can kill it at any moment and start it again.
"""

from __future__ import annotations

import json
import random
import sys

from napari_slide_attention.labels import LabelStore

SLIDES = [f"/cohort/slides/slide-{i}.tif" for i in range(5)]
CLASSES = ("benign", "carcinoma", "atypia", "stroma")


def _polygon(rng: random.Random) -> list[tuple[float, float]]:
    x, y = rng.uniform(0, 5000), rng.uniform(0, 5000)
    return [(x, y), (x + rng.uniform(10, 300), y), (x + rng.uniform(0, 200), y + 150)]


def _tile(rng: random.Random) -> list[tuple[float, float]]:
    x, y, edge = rng.randrange(0, 40) * 256, rng.randrange(0, 40) * 256, 256
    return [(x, y), (x + edge, y), (x + edge, y + edge), (x, y + edge)]


def change(store: LabelStore, n: int, seed: int) -> str:
    """Make change ``n``; gives what it was, in words."""
    rng = random.Random(seed * 1_000_003 + n)
    slide = rng.choice(SLIDES)
    live = store.regions(slide)
    what = rng.choices(
        ["label", "polygon", "tile", "update", "delete", "note", "undo"],
        weights=[30, 15, 15, 15, 5, 10, 10],
    )[0]
    if what in ("update", "delete") and not live:
        what = "tile"
    if what == "undo" and store.undo() is not None:
        return "undo"
    if what == "label" or what == "undo":  # nothing left to undo: a label instead
        status = rng.choice(["accepted", "corrected"])
        store.set_slide_label(slide, rng.choice(CLASSES), status=status, note=f"change {n}")
        return "label"
    if what == "polygon":
        store.add_region(slide, _polygon(rng), rng.choice(CLASSES))
        return "polygon"
    if what == "tile":
        store.add_region(slide, _tile(rng), rng.choice(CLASSES), kind="tile")
        return "tile"
    if what == "note":  # a text of its own, so the note always changes
        store.set_note(slide, f"change {n}: {len(live)} region(s) to look at")
        return "note"
    region = rng.choice(live)
    if what == "delete":
        store.delete_region(region.id)
        return "delete"
    others = [c for c in CLASSES if c != region.label]
    if region.kind == "polygon" and rng.random() < 0.5:
        store.update_region(region.id, geometry=_polygon(rng), note=f"change {n}")
    else:
        store.update_region(region.id, label=rng.choice(others), note=f"change {n}")
    return "update"


def main() -> None:
    path, seed = sys.argv[1], int(sys.argv[2])
    author = sys.argv[3] if len(sys.argv) > 3 else "writer"
    with LabelStore(path, author=author) as store:
        n = len(store.history())
        while True:
            what = change(store, n, seed)
            [last] = store.history(limit=1)
            line = {"n": n, "what": what, "id": last.id, "slide": last.slide}
            line.update(target=last.target, action=last.action, new=last.new)
            print(json.dumps(line), flush=True)  # reported only after the commit
            n += 1


if __name__ == "__main__":
    main()
