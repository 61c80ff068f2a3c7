"""Settings of the smallest models the tests train (shared by test files: import it)."""

from __future__ import annotations

# A dual model's hard attention at its smallest: 2 glimpses of 16 px on 64 px tiles.
TINY_HARD = {
    "glimpses": 2,
    "glimpse_px": 16,
    "tile_px": 64,
    "context_px": 32,
    "feature": 16,
    "hidden": [16, 8],
    "glimpse_channels": [8],
    "context_channels": [8],
}
