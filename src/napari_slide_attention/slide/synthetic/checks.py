"""Argument checks of the synthetic-slide writer: a ValueError naming the argument."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def check_int(
    name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")


def check_positive_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be positive and finite, got {value}")


def check_size(size: Any) -> tuple[int, int]:
    try:
        width, height = size
    except (TypeError, ValueError):
        raise ValueError(f"size must be (width, height), got {size!r}") from None
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"size {name} must be an integer, got {value!r}")
        if value <= 0:
            raise ValueError(f"size {name} must be positive, got {value}")
        # Below this the tissue pieces are too small to be slide-like.
        if value < 64:
            raise ValueError(f"size {name} must be at least 64 px, got {value}")
    return int(width), int(height)


def check_classes(classes: Any) -> tuple[str, ...]:
    if isinstance(classes, str):
        raise ValueError("classes must be a sequence of class names, not a string")
    classes = tuple(classes)
    if len(classes) < 2:
        raise ValueError(f"classes needs at least 2 names (normal first), got {classes!r}")
    if not all(isinstance(c, str) and c for c in classes):
        raise ValueError(f"classes must be non-empty strings, got {classes!r}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes must be unique, got {classes!r}")
    return classes


def check_label(label: Any, classes: tuple[str, ...]) -> int:
    if isinstance(label, str):
        if label not in classes and label.strip().isdigit():  # "0" from a command line
            label = int(label)
        elif label not in classes:
            raise ValueError(
                f"unknown label {label!r}; expected a class name {list(classes)} or its index"
            )
        else:
            return classes.index(label)
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
        raise ValueError(f"label must be a class name or index, got {label!r}")
    if not 0 <= label < len(classes):
        raise ValueError(f"label index {label} out of range for {len(classes)} classes")
    return int(label)
