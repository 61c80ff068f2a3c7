"""The label store of a cohort: slide labels, region labels and notes, with their history.

``LabelStore`` (``store.py``) keeps them in one SQLite file as the records of
``records.py``: ``opening.py`` tells a store from every other file (and creates, checks
and migrates stores), ``schema.py`` holds the tables, versions and migrations, ``edits.py``
writes each change with its history row, ``rows.py`` turns rows into records and history
states; ``exchange.py`` reads and writes QuPath GeoJSON and CSV. Applying the labels to a
training cohort is ``train.labels.apply_labels``: this package never imports training
code.
"""

from __future__ import annotations

from .records import (
    REGION_KINDS,
    STATUSES,
    UNCLASSIFIED,
    Change,
    LabelStoreError,
    Region,
    RegionNotFoundError,
    SlideLabel,
    slide_key,
)
from .schema import SCHEMA_VERSION
from .store import LabelStore

__all__ = [
    "REGION_KINDS",
    "SCHEMA_VERSION",
    "STATUSES",
    "UNCLASSIFIED",
    "Change",
    "LabelStore",
    "LabelStoreError",
    "Region",
    "RegionNotFoundError",
    "SlideLabel",
    "slide_key",
]
