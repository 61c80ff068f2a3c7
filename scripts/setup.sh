#!/usr/bin/env bash
# Set-up on a fresh machine, idempotent: the system packages a headless napari needs
# (Xvfb + Mesa OpenGL + xcb libs) where missing and installable, then .venv with the
# project and its test extra. Later runs skip what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3.12 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python=$candidate; break; fi
  done
fi
[ -n "$python" ] || { echo "setup: no python3 found" >&2; exit 1; }

# -- system packages (Debian/Ubuntu) ----------------------------------------------------
apt_packages=(xvfb xauth libgl1 libegl1 libgl1-mesa-dri libglx-mesa0 libxkbcommon-x11-0
  libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0
  libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libdbus-1-3 libfontconfig1)
if command -v dpkg-query >/dev/null 2>&1; then
  missing=()
  for pkg in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
    echo "setup: installing system packages: ${missing[*]}"
    if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }; then
      echo "setup: could not install ${missing[*]}; GUI tests will skip without a display" >&2
    fi
  fi
fi

# -- Python environment ---------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch: a bare requirement pulls the multi-GB CUDA build. Without an NVIDIA GPU take
  # the CPU wheel first, so the project's range (torch>=2.2) is already satisfied.
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    .venv/bin/python -c "import torch" 2>/dev/null \
      || .venv/bin/python -m pip install -q "torch==2.13.*" --retries 1 --timeout 15 --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
      || .venv/bin/python -m pip install -q "torch==2.13.*"
  fi
  .venv/bin/python -m pip install -q -e ".[testing]"
  # Peers for benchmarks/io.py; optional, so a failure here is not fatal.
  .venv/bin/python -m pip install -q -e ".[peers]" 2>/dev/null \
    || echo "setup: optional benchmark peers (tiffslide, openslide) not installed" >&2
  rm -f .venv/.installed-*
  touch "$stamp"
fi
