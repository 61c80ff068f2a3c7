"""Whole-slide models (torch only: no Qt, no file formats)."""
