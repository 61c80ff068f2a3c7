#!/usr/bin/env bash
# The whole test suite: set-up (system packages, .venv), then pytest under Xvfb with
# Mesa OpenGL when there is no display. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONFAULTHANDLER=1
if [ -z "${DISPLAY:-}" ] && command -v xvfb-run >/dev/null 2>&1; then
  exec xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/python -m pytest "$@"
fi
exec .venv/bin/python -m pytest "$@"
