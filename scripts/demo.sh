#!/usr/bin/env bash
# The main job: set-up, then a sample slide in napari with its overlays. With no
# display it runs headless under Xvfb and writes screenshots and a report to out/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -n "${DISPLAY:-}" ] || [ "$(uname)" = "Darwin" ]; then
  exec .venv/bin/slide-attention demo "$@"
fi
if command -v xvfb-run >/dev/null 2>&1; then
  exec xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/slide-attention demo --headless "$@"
fi
echo "demo: no display and no xvfb-run; install xvfb (scripts/setup.sh tries to)" >&2
exit 1
