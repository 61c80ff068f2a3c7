#!/usr/bin/env bash
# The user guides' screenshots (docs/images/*.png): the demo, headless (Xvfb when there
# is no display), then its screenshots copied next to the guides.
set -euo pipefail
cd "$(dirname "$0")/.."
out=out/demo  # the demo's own folder: its trained models are reused
bash scripts/demo.sh --headless --out "$out"
mkdir -p docs/images
cp "$out"/*.png docs/images/
echo "screenshots: $(ls "$out"/*.png | wc -l) PNGs copied to docs/images"
