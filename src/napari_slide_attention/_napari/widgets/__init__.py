"""The plugin's dock widgets (Plugins menu): Slide, Model, Review, Fine-tune and Tour.

Each is a ``QWidget`` built with ``napari_viewer`` and reaches the others only through
the viewer's ``Session`` (``_napari/session.py``). Importing this package imports no
torch; a panel imports it when it first needs a model.
"""

from __future__ import annotations

import html

__all__ = ["error_html"]


def error_html(text: str) -> str:
    """``text`` as a red line for a panel's rich-text status label (escaped)."""
    return f"<span style='color:#e05050'>{html.escape(str(text))}</span>"
