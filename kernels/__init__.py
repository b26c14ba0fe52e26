"""papo_kernels — the fused two-policy LM head (installed from the ``kernels/`` folder under this name so it
never shadows the PyPI package ``kernels`` that transformers probes for).

    fused_papo_head(hidden, hidden_masked, weight, targets, temperature=1.0, backend="auto")
        -> PapoHeadOutput(logprobs, logprobs_masked, entropy, entropy_masked, kl), each [N]
    fused_logprob_entropy(hidden, weight, targets, temperature=1.0, backend="auto")
        -> LogprobEntropyOutput(logprobs, entropy), each [N]

Backends:
    "torch"  token-chunked plain torch with a closed-form backward (``reference.py``); float64-capable.
    "cpp"    C++/OpenMP, ATen GEMMs per (token, vocab) tile, fused online reductions (``csrc/papo_head.cpp``),
             JIT-built with ninja on first use.
    "triton" Triton kernels (``triton_papo_head.py``); compiled on CUDA, or interpreted with TRITON_INTERPRET=1.
    "auto"   triton for CUDA tensors, cpp for CPU tensors; if the C++ build fails (e.g. no compiler) it warns
             once and uses "torch".
Outputs are float32 (float64 for float64 inputs on the torch and cpp backends).
"""
from __future__ import annotations

import warnings

import torch

from .reference import (
    LogprobEntropyOutput,
    PapoHeadOutput,
    logprob_entropy_chunked,
    logprob_entropy_reference,
    papo_head_chunked,
    papo_head_reference,
)

BACKENDS = ("auto", "torch", "triton", "cpp")

__all__ = [
    "BACKENDS",
    "LogprobEntropyOutput",
    "PapoHeadOutput",
    "fused_logprob_entropy",
    "fused_papo_head",
    "logprob_entropy_reference",
    "papo_head_reference",
    "resolve_backend",
]

_warned_fallback = False


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map "auto" to a concrete backend for tensors on ``device``; validate the name."""
    global _warned_fallback
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed values: {', '.join(map(repr, BACKENDS))}")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        from . import cpp_backend

        if cpp_backend.is_available():
            return "cpp"
        if not _warned_fallback:
            _warned_fallback = True
            warnings.warn(f"papo_kernels: C++ backend unavailable ({cpp_backend.build_error()}); "
                          "falling back to the chunked torch backend", RuntimeWarning, stacklevel=3)
    return "torch"


def fused_papo_head(hidden: torch.Tensor, hidden_masked: torch.Tensor, weight: torch.Tensor,
                    targets: torch.Tensor, temperature: float = 1.0, backend: str = "auto") -> PapoHeadOutput:
    """Log-probs of ``targets``, entropies and KL(p‖q) for p = softmax(hidden·Wᵀ/T),
    q = softmax(hidden_masked·Wᵀ/T), without materializing [N, V] logits.  Differentiable w.r.t. hidden,
    hidden_masked and weight."""
    name = resolve_backend(backend, hidden.device)
    if name == "torch":
        return papo_head_chunked(hidden, hidden_masked, weight, targets, temperature)
    if name == "cpp":
        from .cpp_backend import papo_head_cpp

        return papo_head_cpp(hidden, hidden_masked, weight, targets, temperature)
    from .triton_papo_head import papo_head_triton

    return papo_head_triton(hidden, hidden_masked, weight, targets, temperature)


def fused_logprob_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          temperature: float = 1.0, backend: str = "auto") -> LogprobEntropyOutput:
    """Single-policy companion of :func:`fused_papo_head` (GRPO, reference model): (logprobs, entropy)."""
    name = resolve_backend(backend, hidden.device)
    if name == "torch":
        return logprob_entropy_chunked(hidden, weight, targets, temperature)
    if name == "cpp":
        from .cpp_backend import logprob_entropy_cpp

        return logprob_entropy_cpp(hidden, weight, targets, temperature)
    from .triton_papo_head import logprob_entropy_triton

    return logprob_entropy_triton(hidden, weight, targets, temperature)
