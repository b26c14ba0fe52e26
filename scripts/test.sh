#!/usr/bin/env bash
# Command 2: set up (first time) and run the test suite, two test files at a time (pytest-xdist, one worker per
# core of the 2-core machine; each file stays on one worker, so its module fixtures are built once).
#   bash scripts/test.sh                  everything (what .ci/run runs)
#   bash scripts/test.sh -m "not slow"    the quick tier for the edit loop: no real trainings, launchers or vLLM
#   bash scripts/test.sh -k masking       any other pytest options; -n 0 runs in one process
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec .venv/bin/python -m pytest -q -n "${PAPO_TEST_WORKERS:-2}" --dist loadfile tests "$@"
