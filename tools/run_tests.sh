#!/usr/bin/env bash
# Set up .venv, lint, and run the whole test suite (CI runs exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
bash tools/setup_browser.sh || echo "setup_browser failed; the browser test will skip" >&2
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -n 2 --dist loadgroup --durations=15 "$@"
