"""`train dual --stain`: the paper's tile sampling for the stain, under the user's own values."""

from __future__ import annotations

import pytest

from napari_slide_attention.cli.models import _settings
from napari_slide_attention.cli.parser import build_parser
from napari_slide_attention.train.dual import DualTrainSettings
from napari_slide_attention.train.grid import GridTrainSettings


def _args(*extra: str):
    return build_parser().parse_args(["train", "dual", "--cohort", "c.csv", "--out", "r", *extra])


def test_stain_takes_the_papers_sampling_for_mmr():
    model = _settings(DualTrainSettings, _args("--stain", "mmr")).model
    assert (model["refine"], model["noise"], model["n_tiles"], model["candidates"]) == (
        "kmeans",
        [-2.0, 1.0],
        15,
        30,
    )
    default = _settings(DualTrainSettings, _args()).model  # HER2 is the config's default
    her2 = _settings(DualTrainSettings, _args("--stain", "her2")).model
    assert (her2["refine"], her2["noise"], her2["n_tiles"]) == ("threshold", [0.0, 1.0], 10)
    assert (default["refine"], default["noise"], default["n_tiles"]) == (
        her2["refine"],
        her2["noise"],
        her2["n_tiles"],
    )


def test_options_and_set_given_beside_the_stain_win():
    model = _settings(
        DualTrainSettings, _args("--stain", "mmr", "--n-tiles", "8", "--set", "refine=none")
    ).model
    assert (model["n_tiles"], model["refine"], model["noise"]) == (8, "none", [-2.0, 1.0])


def test_stain_is_refused_for_a_model_without_tile_sampling():
    args = build_parser().parse_args(
        ["train", "grid", "--cohort", "c.csv", "--out", "r", "--stain", "her2"]
    )
    with pytest.raises(ValueError, match="--stain sets dual attention's tile sampling"):
        _settings(GridTrainSettings, args)
    with pytest.raises(SystemExit):  # an unknown stain: argparse's one line
        build_parser().parse_args(["train", "dual", "--cohort", "c", "--out", "r", "--stain", "x"])
