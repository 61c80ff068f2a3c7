"""The optics of an IHC slide: stain vectors and how materials mix (Beer-Lambert).

A material (stroma, a nucleus, a membrane, ...) holds amounts of haematoxylin and DAB; the
light it lets through is ``exp(-(h * H + dab * DAB + grey * GREY))`` per RGB channel, with
the stain vectors of Ruifrok and Johnston (those ``skimage.color.rgb2hed`` unmixes), so
the stains measured back from a written slide are the amounts drawn. Materials that share
a pixel mix linearly in transmitted light.
"""

from __future__ import annotations

import numpy as np

H = np.array([0.65, 0.70, 0.29], dtype=np.float32)
"""Haematoxylin: optical density per unit amount (R, G, B)."""
DAB = np.array([0.27, 0.57, 0.78], dtype=np.float32)
"""DAB (diaminobenzidine, brown): optical density per unit amount."""
GREY = np.array([1.0, 1.0, 1.0], dtype=np.float32)
"""Unstained tissue scatters a little light evenly."""


def transmitted(h: float = 0.0, dab: float = 0.0, grey: float = 0.0) -> np.ndarray:
    """Light (3,) let through by a material with these stain amounts."""
    return np.exp(-(h * H + dab * DAB + grey * GREY)).astype(np.float32)


def lerp(base: np.ndarray, colour: np.ndarray, alpha: np.ndarray | float) -> np.ndarray:
    """``base`` with ``colour`` laid over it at coverage ``alpha`` (transmitted light)."""
    a = alpha[:, :, None] if np.ndim(alpha) == 2 else alpha
    return base + (colour - base) * a
