#!/usr/bin/env bash
# Command 2: set up (first time) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec .venv/bin/python -m pytest -q tests "$@"
