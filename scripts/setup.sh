#!/usr/bin/env bash
# Create .venv and install papo-engine with the pinned CPU stack (idempotent; ~1-2 min the first time).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
stamp=.venv/.papo-installed
want=$(cat setup.py | sha1sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "papo-engine: setting up .venv (pinned CPU stack: torch 2.13 CPU, deepspeed, transformers) ..."
  [ -d .venv ] || "$PYTHON" -m venv .venv
  # DS_BUILD_OPS=0: DeepSpeed's ops are JIT-built on first use; nothing needs CUDA at install time.
  DS_BUILD_OPS=0 .venv/bin/pip install --disable-pip-version-check -q -e '.[dev]' 2>&1 \
    | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import papo_engine, papo_kernels, deepspeed, transformers" \
    || { echo "papo-engine: install failed (see pip output above)"; exit 1; }
  echo "$want" > "$stamp"
fi
