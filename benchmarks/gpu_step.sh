#!/usr/bin/env bash
# benchmarks/gpu_step.py on a bare CUDA machine with torch, triton and transformers but no DeepSpeed: the wheels
# it lacks travel in .whl/ (README "What was verified where" lists them). First the tiny model on the GPU (the
# CUDA code paths, ~1 min; stops here if it fails), then the 3B-shaped run. Logs and results go to ${OUT:-gpu_out}.
#   [SKIP_SMOKE=1] bash benchmarks/gpu_step.sh [seconds for the 3B run, default 420]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
# the kernels/ folder imports as papo_kernels without pip (papo_kernels.csrc -> csrc/)
mkdir -p /tmp/papo_path
ln -sfn "$PWD/kernels" /tmp/papo_path/papo_kernels
[ -e kernels/csrc ] || ln -s ../csrc kernels/csrc
export PYTHONPATH=$PWD:/tmp/papo_path${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
[ -n "${SKIP_SMOKE:-}" ] || timeout 150 python3 benchmarks/gpu_step.py --smoke --out-dir "$OUT" model.dtype=bfloat16 deepspeed.zero_stage=2 \
  > "$OUT/smoke.log" 2>&1
status=$?
[ -n "${SKIP_SMOKE:-}" ] || grep -v -i warn "$OUT/smoke.log" | tail -15
[ $status -eq 0 ] || { echo "smoke run failed ($status)"; tail -40 "$OUT/smoke.log"; exit $status; }
timeout "${1:-420}" python3 benchmarks/gpu_step.py --out-dir "$OUT" > "$OUT/full.log" 2>&1
status=$?
grep -v -i warn "$OUT/full.log" | tail -60
[ -L kernels/csrc ] && rm kernels/csrc
exit $status
