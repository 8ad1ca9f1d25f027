#!/usr/bin/env bash
# Set up a virtual environment (if needed), lint, check formatting and run the whole test suite.
#   bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
python -m ruff check jaxspeech scripts experiments tests
python -m ruff format --check jaxspeech scripts experiments tests
python -m pytest -n 2 --dist loadgroup --durations=15 "$@"
