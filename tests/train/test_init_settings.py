"""``--init``: settings given with a checkpoint agree with it, parts (dicts) by their keys."""

from __future__ import annotations

import json

import pytest

from napari_slide_attention.train.dual import CPU_PRESET, DualTrainSettings


def _checkpoint_config() -> dict:
    """A dual checkpoint's config as training writes it: its hard part also holds the
    tile normalisation that training measured."""
    settings = DualTrainSettings.from_dict(json.loads(json.dumps(CPU_PRESET)))
    config = settings.model_config(("0", "1+")).to_dict()
    config["hard"] = {**config["hard"], "mean": [0.8, 0.79, 0.83], "std": [0.09, 0.09, 0.09]}
    return config


def test_the_same_part_settings_as_the_checkpoint_are_no_clash():
    # the benchmarks' soft-then-hard runs give the preset again with --init
    settings = DualTrainSettings.from_dict(json.loads(json.dumps(CPU_PRESET)))
    taken = settings.with_model(_checkpoint_config())
    assert taken.model["hard"]["mean"] == [0.8, 0.79, 0.83]  # the checkpoint's part, whole
    assert taken.model["hard"]["glimpses"] == CPU_PRESET["model"]["hard"]["glimpses"]


def test_a_part_setting_that_differs_from_the_checkpoint_is_refused():
    preset = json.loads(json.dumps(CPU_PRESET))
    preset["model"]["hard"]["glimpses"] = 6
    with pytest.raises(ValueError, match=r"--init takes the model's settings.*hard="):
        DualTrainSettings.from_dict(preset).with_model(_checkpoint_config())
