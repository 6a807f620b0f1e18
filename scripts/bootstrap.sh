#!/usr/bin/env bash
# Create .venv in the repository (once) and install qwen-ondevice with the demo model and test extras.
# Re-running is cheap: the install is skipped while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.qwen-ondevice-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch==2.13.0 is pinned in pyproject.toml (the CPU build; an unpinned torch pulls a CUDA build)
  .venv/bin/python -m pip install -q -e '.[export,demo,test]'
  echo "$want" > "$stamp"
fi
