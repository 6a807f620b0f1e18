#!/usr/bin/env bash
# The main job on the demo model: set up, then answer a prompt with it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
PROMPT=${PROMPT:-"Write a Python function that returns the n-th Fibonacci number."}
.venv/bin/qwen-ondevice generate demo --prompt "$PROMPT" --max-new-tokens 200
