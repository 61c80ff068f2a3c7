"""The plugin's dock widgets (Plugins menu): Slide, Model, Review, Fine-tune and Tour.

Each is a ``QWidget`` built with ``napari_viewer`` and reaches the others only through
the viewer's ``Session`` (``_napari/session.py``). Importing this package imports no
torch; a panel imports it when it first needs a model.
"""
