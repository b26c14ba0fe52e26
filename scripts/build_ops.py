"""Build the C++ extensions that are otherwise JIT-compiled on first use, once, at set-up time (scripts/setup.sh).

On a CPU machine a first training run (or the first test that needs one) would otherwise compile them itself,
~1 min each on 2 cores: the fused head's and the decode attention's C++ ops (papo_kernels), and DeepSpeed's shared-memory
communication op (every process group), CPU Adam (deepspeed.offload_optimizer) and FusedAdam
(offload_states_during_rollout). They are cached in $TORCH_EXTENSIONS_DIR (scripts/env.sh), so this is a no-op
when they are built. A failure here is only a warning: the op is then built on first use, as before.
On a CUDA machine nothing is built here (DeepSpeed's GPU ops are built with nvcc on first use).
"""
from __future__ import annotations

import sys
import time


def main() -> int:
    import torch

    if torch.cuda.is_available():
        return 0
    start = time.time()
    failed = []
    try:
        from papo_kernels import cpp_backend
        for which in cpp_backend.EXTENSIONS:
            cpp_backend.load(which)
    except Exception as exc:  # noqa: BLE001
        failed.append(f"papo_kernels C++ ops: {exc}")
    try:
        from deepspeed.accelerator import get_accelerator
        accelerator = get_accelerator()
        for name in ("ShareMemCommBuilder", "CPUAdamBuilder", "FusedAdamBuilder"):
            builder = accelerator.create_op_builder(name)
            if builder is not None and builder.is_compatible(verbose=False):
                builder.load(verbose=False)
    except Exception as exc:  # noqa: BLE001
        failed.append(f"deepspeed ops: {exc}")
    for line in failed:
        print(f"papo-engine: warning: could not pre-build {line} (it is built on first use instead)",
              file=sys.stderr)
    print(f"papo-engine: C++ extensions ready ({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
