"""Shared test set-up: test helpers (tests/slide_files.py) import as top-level modules."""
