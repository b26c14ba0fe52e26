#!/usr/bin/env bash
# Command 1: set up (first time) and run the default PAPO training run on the embedded tiny model.
# Extra arguments are passed on as overrides, e.g.  bash scripts/train.sh trainer.steps=20
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec .venv/bin/papo train --config configs/tiny_cpu.yaml "$@"
