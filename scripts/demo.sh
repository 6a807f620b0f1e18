#!/usr/bin/env bash
# The main job on the demo model: set up, export it to a w4a16 bundle (resumes if interrupted),
# then answer a prompt from the bundle.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
PROMPT=${PROMPT:-"Write a Python function that returns the n-th Fibonacci number."}
OUT=${OUT:-bundles/demo}
.venv/bin/qwen-ondevice export demo --out "$OUT"
.venv/bin/qwen-ondevice generate "$OUT" --prompt "$PROMPT" --max-new-tokens 200
