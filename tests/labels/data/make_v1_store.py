"""How ``v1.labels.sqlite`` was made: run with the LabelStore of schema version 1
(commit 88bcabb, before schema version 2) as
``python tests/labels/data/make_v1_store.py tests/labels/data/v1.labels.sqlite``.

Kept to document the fixture; the tests read the file, they never run this script (the
code it needs is gone). ``test_label_store_migration.py`` lists what the file holds.
"""

import sys

from napari_slide_attention.labels import SCHEMA_VERSION, LabelStore

assert SCHEMA_VERSION == 1
A, B, C = "/study/slides/a.tif", "/study/slides/b.tif", "/study/slides/c é.tif"
with LabelStore(sys.argv[1], author="ann") as store:
    store.set_slide_label(A, "benign", status="accepted")
    store.set_slide_label(A, "carcinoma", note="lesion at 3 o'clock", author="bob")
    store.set_slide_label(B, "benign", status="accepted")
    store.set_slide_label(C, "atypia")
    store.undo(slide=C)  # C ends with no label
    square = store.add_region(
        A,
        [(10, 20), (110, 20), (110, 70.5), (10, 70.5)],
        "carcinoma",
        kind="rectangle",
        note="big one",
    )
    store.add_region(A, [(0, 0), (40.5, 0), (20, 30.25)], "benign")
    tile = store.add_region(B, [(0, 0), (256, 0), (256, 256), (0, 256)], "carcinoma", kind="tile")
    store.update_region(square.id, label="atypia", note="on second look")
    store.delete_region(tile.id)
    gone = store.add_region(B, [(5, 5), (50, 5), (5, 50)], "stroma")
    store.delete_region(gone.id)
    store.undo(slide=B)  # the stroma triangle is back
    store.set_note(A, "blurry in the corner — 中文 too")
    store.set_note(B, "check stain")
