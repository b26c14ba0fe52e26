#!/usr/bin/env bash
# Build .venv-trl: the benchmark-only environment for benchmarks/vs_trl.py and tests/test_trl_semantics.py.
#
#   bash benchmarks/setup_trl_env.sh        # idempotent; ~2 GB and a few minutes the first time
#
# It holds TRL 1.7.1 (the last release that ships trl.experimental.papo.PAPOTrainer; removed in 1.8) beside
# papo-engine installed editable, on the SAME torch build as .venv (torch 2.13.0 CPU, taken from this disk) and
# the same transformers (5.19.0), so the two systems are compared on one stack. Extra pieces TRL needs:
#   - requests: trl 1.7.1 imports it without declaring it;
#   - torchvision (same release as .venv): TRL's Qwen2.5-VL processor imports it. PyPI's build is CUDA-built and
#     fails to import beside CPU torch until scripts/fix_cpu_vllm_stack.py guards its nms/qnms fake-op
#     registrations (the same repair .venv gets; it acts on the python that runs it).
# vLLM is not installed here (TRL generates with HF generate in this benchmark).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=.venv-trl
TORCH=2.13.0
TORCHVISION=0.28.0
TRANSFORMERS=5.19.0
TRL=1.7.1
fail() { echo "setup_trl_env: ERROR: $*" >&2; exit 1; }
log=$(mktemp); trap 'rm -f "$log"' EXIT
pip_install() {  # pip_install WHAT... : quiet pip install; on failure show pip's last lines and stop
  if ! DS_BUILD_OPS=0 "$VENV/bin/pip" install --disable-pip-version-check -q "$@" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" | tail -15 >&2
    fail "pip install $* failed"
  fi
}
stamp=$VENV/.trl-installed
want=$(cat setup.py benchmarks/setup_trl_env.sh scripts/fix_cpu_vllm_stack.py | sha1sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup_trl_env: $VENV is up to date"
else
  echo "setup_trl_env: building $VENV (torch $TORCH CPU, transformers $TRANSFORMERS, trl $TRL, papo-engine -e) ..."
  [ -d "$VENV" ] || "$PYTHON" -m venv "$VENV" || fail "could not create $VENV with $PYTHON"
  # torch first and pinned: a bare `torch` requirement from any other package would pull a multi-GB CUDA build.
  pip_install "torch==$TORCH" numpy
  "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH')" \
    || fail "torch $TORCH did not install into $VENV"
  # papo-engine editable, without the vllm extras (brings transformers 5.19.0, deepspeed, accelerate ...)
  pip_install -e '.[dev]' "torch==$TORCH"
  # TRL itself, pinned beside the stack it must not move
  pip_install "trl==$TRL" requests "torchvision==$TORCHVISION" "torch==$TORCH" "transformers==$TRANSFORMERS"
  "$VENV/bin/python" scripts/fix_cpu_vllm_stack.py || fail "torchvision does not import beside CPU torch in $VENV"
  "$VENV/bin/python" - <<EOF || fail "the installed versions are not the pinned ones (see above)"
import sys
from importlib.metadata import version
want = {"torch": "$TORCH", "transformers": "$TRANSFORMERS", "trl": "$TRL", "torchvision": "$TORCHVISION"}
bad = {k: version(k) for k, v in want.items() if version(k).split("+")[0] != v}
sys.exit(f"setup_trl_env: wrong versions {bad}, wanted {want}" if bad else 0)
EOF
  DS_ACCELERATOR=cpu TRL_EXPERIMENTAL_SILENCE=1 "$VENV/bin/python" -c \
    "import requests, torchvision, papo_engine, papo_kernels; from trl.experimental.papo import PAPOTrainer, PAPOConfig; from trl import GRPOTrainer" \
    || fail "trl / papo_engine do not import in $VENV (see the error above)"
  echo "$want" > "$stamp"
fi
echo "setup_trl_env: $VENV has: $("$VENV/bin/python" - <<'EOF'
from importlib.metadata import version
print(", ".join(f"{p} {version(p)}" for p in ["torch", "torchvision", "transformers", "trl", "accelerate",
                                              "deepspeed", "requests", "papo-engine"]))
EOF
)"
