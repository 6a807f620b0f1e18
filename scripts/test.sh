#!/usr/bin/env bash
# Set up (once) and run the whole test suite, the real demo model included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest -q "$@"
