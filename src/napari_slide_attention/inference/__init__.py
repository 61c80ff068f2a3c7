"""Whole-slide inference: ``predict`` runs any kind of model on a slide.

``predict(model, slide, **options)`` looks the model's kind up in the model-kind table
(``models/registry.py``) and runs that kind's generator (``inference/grid.py``,
``inference/dual.py``, ``inference/sliding_window.py``): it yields progress events and
returns a ``SlideResult``. Every kind takes the common options (device, amp, tissue,
mpp); an option a kind cannot honour (``aggregation`` for the dual model, say) is
refused before any work starts, naming the option and what the kind takes.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Generator
from typing import Any

import torch

from ..jobs import Progress
from ..models.checkpoint import read_checkpoint
from ..models.registry import model_kind
from ..results import SlideResult
from ..slide.reader import Slide
from .common import AGGREGATIONS, LoadedModel, aggregate, load_model_for_inference

__all__ = [
    "AGGREGATIONS",
    "LoadedModel",
    "aggregate",
    "load_model_for_inference",
    "predict",
    "predict_options",
]


def predict_options(kind: str) -> tuple[str, ...]:
    """The options ``predict`` takes for a model kind, in the order of its signature."""
    function = model_kind(kind).load("predict")
    return tuple(
        name
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    )


def predict(
    model: torch.nn.Module | str | os.PathLike,
    slide: Slide | str | os.PathLike,
    **options: Any,
) -> Generator[Progress, None, SlideResult]:
    """Run a model of any kind on a slide.

    Args:
        model: a model, or a checkpoint path (its header says the kind).
        slide: an opened slide or its path.
        **options: the kind's options (``predict_options(kind)``): device, amp, tissue,
            mpp for every kind; chunk_tiles, min_tissue, aggregation, pieces for grid
            attention and the sliding window (top_k for the latter); sampler, seed for
            dual attention.

    Yields:
        The kind's progress events ("tissue", "tiles", "piece", "attention" ...).

    Returns:
        The slide's ``SlideResult``.

    Raises:
        ValueError: an option the model's kind does not take (before any work), or an
            unknown kind.
    """
    if isinstance(model, torch.nn.Module):
        kind = getattr(getattr(model, "config", None), "kind", type(model).__name__)
    else:
        kind = read_checkpoint(model, tensors=False).kind
    entry = model_kind(kind)
    taken = predict_options(kind)
    refused = sorted(set(options) - set(taken))
    if refused:
        raise ValueError(
            f"a {kind} model does not take the option(s) {', '.join(refused)} "
            f"(it takes: {', '.join(taken)})"
        )
    return (yield from entry.load("predict")(model, slide, **options))
