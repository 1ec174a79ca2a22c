#!/usr/bin/env bash
# The test command: set up, lint, type-check, and run every test (slow end-to-end ones included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check airgap tests scripts
.venv/bin/mypy airgap
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=25 "$@"
