"""Attention-based classification of whole-slide pathology images.

Kept light on purpose: napari reads the manifest and imports submodules by
``python_name`` only when a contribution is used, so opening napari does not
import the models.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
