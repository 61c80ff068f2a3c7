"""The model-kind table: every entry resolves, and names map both ways."""

from __future__ import annotations

import inspect

import pytest

from napari_slide_attention.models.registry import KINDS, kind_named, model_kind


@pytest.mark.parametrize("name", sorted(KINDS))
def test_every_entry_resolves_to_its_parts(name):
    kind = KINDS[name]
    config = kind.config_from_dict({"classes": ["a", "b"]})
    assert config.kind == name  # the config says the kind the checkpoint will carry
    model = kind.build(config)
    assert model.config is config
    for part in ("predict", "train", "settings"):
        if getattr(kind, part):
            assert callable(kind.load(part))
        else:
            with pytest.raises(ValueError, match=f"no {part}"):
                kind.load(part)
    if kind.predict:
        parameters = inspect.signature(kind.load("predict")).parameters
        assert list(parameters)[:2] == ["model", "slide"]
        assert {"device", "amp", "tissue", "mpp"} <= set(parameters)
    if kind.settings:
        assert kind.load("settings").model_type is type(config)


def test_train_names_and_kinds_map_both_ways():
    for name, kind in KINDS.items():
        if kind.train_name:
            assert kind_named(kind.train_name) is kind and model_kind(name) is kind
    assert {k.train_name for k in KINDS.values() if k.fine_tunes} == {"grid", "dual"}
    with pytest.raises(ValueError, match=r"unknown model kind .toy.*grid-attention"):
        model_kind("toy")
    with pytest.raises(ValueError, match="unknown model 'svm'"):
        kind_named("svm")
