"""Slides: lazy pyramidal reading, tissue, tiling and synthetic slides (numpy/dask only)."""
