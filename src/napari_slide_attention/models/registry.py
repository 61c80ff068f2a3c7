"""The model-kind table: each kind of model, its config, its module, how it predicts and
how it trains, in one place.

The entries name their parts by import path ("module:attribute") and load them on first
use, so that reading the table (a file picker asking what a checkpoint holds, the CLI
listing kinds) imports neither torch nor the layers above ``models/``: ``inference/``
and ``train/`` register nothing, they are just named here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

__all__ = ["KINDS", "ModelKind", "kind_named", "model_kind"]

_PACKAGE = "napari_slide_attention"


@dataclass(frozen=True)
class ModelKind:
    """One kind of model.

    Attributes:
        name: the kind as checkpoints store it ("grid-attention").
        train_name: the ``slide-attention train`` model name ("grid"), or "" when the
            kind is trained only as a part of another.
        config: "module:Class" of its config dataclass (``from_dict``/``to_dict``).
        module: "module:Class" of its ``torch.nn.Module`` (built from the config).
        predict: "module:function" of its slide inference generator, or "".
        train: "module:function" of its training generator, or "".
        settings: "module:Class" of its training settings, or "".
        fine_tunes: whether ``train --init`` can start from its checkpoints.
    """

    name: str
    train_name: str
    config: str
    module: str
    predict: str = ""
    train: str = ""
    settings: str = ""
    fine_tunes: bool = False

    def load(self, part: str) -> Any:
        """The object an entry names ("config", "module", "predict", "train", "settings").

        Raises:
            ValueError: the kind has no such part.
        """
        where = getattr(self, part)
        if not where:
            raise ValueError(f"a {self.name} model has no {part}")
        module, _, attribute = where.partition(":")
        return getattr(importlib.import_module(f"{_PACKAGE}.{module}"), attribute)

    def config_from_dict(self, data: dict[str, Any]) -> Any:
        """The kind's config from a checkpoint header's ``config``."""
        return self.load("config").from_dict(data)

    def build(self, config: Any) -> Any:
        """A fresh model of this kind from its config."""
        return self.load("module")(config)


KINDS: dict[str, ModelKind] = {
    kind.name: kind
    for kind in (
        ModelKind(
            "grid-attention",
            "grid",
            "models.grid_attention:GridAttentionConfig",
            "models.grid_attention:GridAttention",
            predict="inference.grid:predict_grid",
            train="train.grid:train_grid",
            settings="train.grid:GridTrainSettings",
            fine_tunes=True,
        ),
        ModelKind(
            "dual-attention",
            "dual",
            "models.dual_attention:DualAttentionConfig",
            "models.dual_attention:DualAttention",
            predict="inference.dual:predict_dual",
            train="train.dual:train_dual",
            settings="train.dual:DualTrainSettings",
            fine_tunes=True,
        ),
        ModelKind(
            "sliding-window",
            "sliding-window",
            "models.sliding_window:SlidingWindowConfig",
            "models.sliding_window:CropClassifier",
            predict="inference.sliding_window:predict_sliding_window",
            train="train.sliding_window:train_sliding_window",
            settings="train.sliding_window:SlidingWindowSettings",
        ),
        ModelKind(
            "hard-attention",
            "",
            "models.hard_attention:HardAttentionConfig",
            "models.hard_attention:HardAttention",
        ),
    )
}


def model_kind(name: str) -> ModelKind:
    """The table's entry for a checkpoint's kind.

    Raises:
        ValueError: an unknown kind (the message lists the known ones).
    """
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(
            f"unknown model kind {name!r} (known: {', '.join(sorted(KINDS))})"
        ) from None


def kind_named(train_name: str) -> ModelKind:
    """The entry for a ``slide-attention train`` model name ("grid", "dual", ...)."""
    for kind in KINDS.values():
        if kind.train_name and kind.train_name == train_name:
            return kind
    names = sorted(k.train_name for k in KINDS.values() if k.train_name)
    raise ValueError(f"unknown model {train_name!r} (known: {', '.join(names)})")
