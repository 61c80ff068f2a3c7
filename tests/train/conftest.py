"""A tiny synthetic cohort shared by the training and inference tests."""

from __future__ import annotations

import pytest

from napari_slide_attention.train.cohort import make_synthetic_cohort


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    """Four classes, one slide per class in train and val, small slides."""
    directory = tmp_path_factory.mktemp("tiny-cohort")
    return make_synthetic_cohort(
        directory,
        slides_per_class={"train": 1, "val": 1, "test": 1},
        size=(2048, 1280),
        seed=5,
        lesion_size=90,
        n_pieces=2,
    )
