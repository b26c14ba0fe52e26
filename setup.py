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
    "transformers==5.24.0",
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
        # GPU extras: vLLM pins its own torch; install them on a CUDA machine, not on the CPU stack.
        "gpu": ["vllm", "flash-attn"],
        "dev": ["pytest", "pytest-timeout"],
    },
    entry_points={"console_scripts": ["papo=papo_engine.cli:main"]},
)
