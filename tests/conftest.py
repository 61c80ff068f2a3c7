"""Shared test set-up: test helpers (tests/slide_files.py) import as top-level modules,
and a tiny synthetic cohort for the training and inference tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    """Four classes, one slide per class and split, two tissue pieces per slide."""
    from napari_slide_attention.train.cohort import make_synthetic_cohort

    directory = tmp_path_factory.mktemp("tiny-cohort")
    return make_synthetic_cohort(
        directory,
        slides_per_class={"train": 1, "val": 1, "test": 1},
        size=(2048, 1280),
        seed=5,
        lesion_size=90,
        n_pieces=2,
    )


@pytest.fixture(scope="session")
def tiny_grid_model(tiny_cohort, tmp_path_factory):
    """A grid-attention checkpoint trained for one epoch on the tiny cohort."""
    from napari_slide_attention.jobs import run_to_end
    from napari_slide_attention.train.grid import GridTrainSettings, train_grid

    run = tmp_path_factory.mktemp("tiny-grid-run")
    settings = GridTrainSettings.from_dict(
        dict(epochs=1, tile_um=128.0, input_px=64, n_maps=4, chunk_tiles=32, normalise_tiles=16)
    )
    summary = run_to_end(train_grid(tiny_cohort, run, settings))
    return summary.last
