#!/usr/bin/env bash
# GPU checks of the fused head on a bare CUDA machine (no install needed): compiled Triton tests against the
# float64 oracle, an optional tile sweep, and benchmarks/kernels.py.  Logs and results go to ${OUT:-gpu_out}.
#   bash benchmarks/kernels_gpu.sh [tests] [tune] [bench] [quick]
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0   # compiled kernels (tests/conftest.py defaults it to 1)
# import the kernels/ folder as papo_kernels without pip (papo_kernels.csrc -> csrc/)
mkdir -p /tmp/papo_path
ln -sfn "$PWD/kernels" /tmp/papo_path/papo_kernels
[ -e kernels/csrc ] || ln -s ../csrc kernels/csrc
export PYTHONPATH=/tmp/papo_path${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
for step in "$@"; do
  case $step in
    tests) timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "triton" 2>&1 | tee "$OUT/tests.log" | tail -25 ;;
    tune)  timeout 240 python3 benchmarks/kernels_gpu_tune.py --out "$OUT/tune.json" 2>&1 | tail -20 ;;
    quick) timeout 200 python3 benchmarks/kernels.py --device cuda --quick --out-dir "$OUT" 2>&1 | tail -25 ;;
    bench) timeout 500 python3 benchmarks/kernels.py --device cuda --out-dir "$OUT" 2>&1 | tail -40 ;;
  esac
done
[ -L kernels/csrc ] && rm kernels/csrc
true
