"""Everything that imports napari or Qt lives here, and nothing else does."""
