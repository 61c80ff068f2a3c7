"""GUI tests need a real OpenGL context: under Xvfb + Mesa (scripts/test.sh) or a display."""

from __future__ import annotations

import os
import sys

import pytest


def pytest_collection_modifyitems(config, items):
    headless = sys.platform.startswith("linux") and not os.environ.get("DISPLAY")
    if not headless:
        return
    skip = pytest.mark.skip(reason="no display: run the suite with scripts/test.sh (Xvfb + Mesa)")
    for item in items:
        if "gui" in item.keywords:
            item.add_marker(skip)
