"""C++/OpenMP CPU ops: the fused head (``csrc/papo_head.cpp``, with its autograd wrapper here) and the native
rollout's decode-step attention and keyed sampling (``csrc/decode_step.cpp``: `decode_attention_cpp`,
`keyed_sample_cpp`).

Each extension is compiled on first use with ninja through ``torch.utils.cpp_extension.load`` into
``$TORCH_EXTENSIONS_DIR`` if set, else ``~/.cache/papo_engine/torch_extensions``.  The sources are found through
the ``papo_kernels.csrc`` package, so the editable install and a wheel behave the same.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import threading
from pathlib import Path
from typing import Optional

import torch

from .reference import LogprobEntropyOutput, PapoHeadOutput, check_inputs

EXTENSIONS = {"head": ("papo_head_cpp", "papo_head.cpp"), "decode": ("papo_decode_cpp", "decode_step.cpp")}
_BUILT: dict[str, object] = {}
_ERRORS: dict[str, str] = {}
_LOCK = threading.Lock()


def _source(file: str) -> str:
    from . import csrc

    return str(Path(csrc.__file__).resolve().parent / file)


def _build_dir() -> str:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "papo_engine", "torch_extensions")
    os.makedirs(root, exist_ok=True)
    return root


def _isa_tag() -> str:
    """Short hash of the CPU's feature flags: the build uses -march=native, so a cache folder shared by machines
    with different CPUs (a network home) must not hand an AVX-512 build to a CPU without it."""
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            flags += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def load(which: str = "head", verbose: bool = False):
    """Build (first call) and import the extension `which` (EXTENSIONS); raises RuntimeError with a clear message
    on failure."""
    with _LOCK:
        if which in _BUILT:
            return _BUILT[which]
        if which in _ERRORS:
            raise RuntimeError(_ERRORS[which])
        name, file = EXTENSIONS[which]
        try:
            cxx = os.environ.get("CXX", "c++")
            if shutil.which(cxx) is None:
                raise RuntimeError(f"no C++ compiler found (looked for {cxx!r} on PATH; set CXX or install g++)")
            src = _source(file)
            if not os.path.exists(src):
                raise RuntimeError(f"missing source {src}")
            from torch.utils import cpp_extension

            if not cpp_extension.is_ninja_available():
                raise RuntimeError("ninja is not installed (pip install ninja)")
            _BUILT[which] = cpp_extension.load(
                name=f"{name}_{_isa_tag()}",
                sources=[src],
                extra_cflags=["-O3", "-fopenmp", "-march=native", "-ffp-contract=fast"],
                extra_ldflags=["-fopenmp"],
                build_directory=_build_dir(),
                verbose=verbose,
            )
        except Exception as exc:  # noqa: BLE001 — any build failure becomes one clear message
            _ERRORS[which] = f"building the papo_kernels C++ extension {name} failed: {exc}"
            raise RuntimeError(_ERRORS[which]) from exc
        return _BUILT[which]


def is_available(which: str = "head") -> bool:
    try:
        load(which)
        return True
    except RuntimeError:
        return False


def build_error(which: str = "head") -> Optional[str]:
    return _ERRORS.get(which)


def decode_attention_cpp(qkv, heads: int, cos, sin, prompt_keys, prompt_values, prompt_bias, row_group, keys,
                         values, slot: int, scale: float) -> torch.Tensor:
    """The native rollout's decode-step attention, float32 CPU tensors (shapes in ``csrc/decode_step.cpp``):
    rotary embedding of the new query and key heads in `qkv` [rows, (heads + 2·kv)·hd], the new key and value
    written at `slot` of `keys` / `values`, attention over the row's prompt slots and generated slots 0..slot.
    Output [rows, heads·hd]."""
    return load("decode").decode_attention(qkv, heads, cos, sin, prompt_keys, prompt_values, prompt_bias,
                                           row_group, keys, values, slot, scale)


def keyed_sample_cpp(logits, u, temperature: float, block: int, banned, eos: int, eos_rule):
    """Inverse-CDF draws at quantiles `u` (float64 [rows]) from softmax(logits / T) over the allowed tokens (not
    `banned`; eos per row: `eos_rule` int8, 0 allowed, 1 not, 2 alone), float32 CPU logits [rows, V] (unchanged).
    Returns (tokens int64 [rows], logsumexp(logits / T) float32 [rows] over every token)."""
    return load("decode").keyed_sample(logits, u, temperature, block, banned, eos, eos_rule)


# ---------------------------------------------------------------------------------------------------------------
# autograd wrapper
# ---------------------------------------------------------------------------------------------------------------
class _CppHead(torch.autograd.Function):
    """Fused head on the CPU (one or two policies); all math in ``csrc/papo_head.cpp``.

    Forward:  lp = a_y − lse_a, lq = b_y − lse_b, H_a = lse_a − E_p[a], H_b = lse_b − E_q[b],
              KL = E_p[a − b] − (lse_a − lse_b), with a = h_o·Wᵀ/τ, b = h_m·Wᵀ/τ, never stored as [N, V].
    Backward: dA = g_lp·(1_y − p) − g_Ha·p·(a − E_p[a]) + g_KL·p·(δ − E_p[δ])
              dB = g_lq·(1_y − q) − g_Hb·q·(b − E_q[b]) + g_KL·(q − p)
              dh_o = dA·W/τ, dh_m = dB·W/τ, dW = (dAᵀ·h_o + dBᵀ·h_m)/τ, by recomputing the logits per tile.
    Outputs that receive no gradient are treated as zero, and a branch with no gradient is not recomputed.
    """

    @staticmethod
    def forward(ctx, hidden, hidden_masked, weight, targets, temperature, block_v, chunk_n):
        ext = load()
        two = hidden_masked is not None
        inv_t = 1.0 / float(temperature)
        y = targets.long().contiguous()
        h_o = hidden.contiguous()
        h_m = hidden_masked.contiguous() if two else None
        w = weight.contiguous()
        outs, stats = ext.forward(h_o, h_m, w, y, inv_t, block_v, chunk_n)
        ctx.save_for_backward(h_o, h_m, w, y, outs, stats)
        ctx.two, ctx.inv_t, ctx.block_v, ctx.chunk_n = two, inv_t, block_v, chunk_n
        ctx.set_materialize_grads(False)
        out_dtype = torch.float64 if outs.dtype == torch.float64 else torch.float32
        return tuple(o.to(out_dtype) for o in outs.unbind(0))

    @staticmethod
    def backward(ctx, *grads):
        h_o, h_m, w, y, outs, stats = ctx.saved_tensors
        two = ctx.two
        n = h_o.shape[0]
        none = (None,) * 7
        if all(g is None for g in grads):
            return none
        g = torch.stack([gg.to(outs.dtype) if gg is not None else torch.zeros(n, dtype=outs.dtype) for gg in grads])
        if two:
            # branch a gets gradient from lp, H_a, KL; branch b from lq, H_b, KL
            do_a = any(grads[i] is not None for i in (0, 2, 4))
            do_b = any(grads[i] is not None for i in (1, 3, 4))
        else:
            do_a, do_b = True, False
        need_h, need_hm, need_w = ctx.needs_input_grad[0], two and ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dh, dhm, dw = load().backward(h_o, h_m, w, y, outs, stats, g, ctx.inv_t, need_h, need_hm, need_w,
                                      do_a, do_b, ctx.block_v, ctx.chunk_n)
        return (dh.to(h_o.dtype) if need_h else None,
                dhm.to(h_m.dtype) if need_hm else None,
                dw.to(w.dtype) if need_w else None,
                None, None, None, None)


def _check_targets(targets: torch.Tensor, vocab: int) -> None:
    # the kernel would silently read no target logit for an out-of-range id (cheap to check on the CPU)
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(f"targets must lie in [0, {vocab}), got range [{int(targets.min())}, {int(targets.max())}]")


def papo_head_cpp(hidden: torch.Tensor, hidden_masked: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  temperature: float = 1.0, block_v: int = 0, chunk_n: int = 0) -> PapoHeadOutput:
    """Two-policy fused head on CPU tensors (block_v / chunk_n = 0: the defaults in papo_head.cpp)."""
    check_inputs(hidden, hidden_masked, weight, targets)
    _check_targets(targets, weight.shape[0])
    return PapoHeadOutput(*_CppHead.apply(hidden, hidden_masked, weight, targets, temperature, block_v, chunk_n))


def logprob_entropy_cpp(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        temperature: float = 1.0, block_v: int = 0, chunk_n: int = 0) -> LogprobEntropyOutput:
    check_inputs(hidden, None, weight, targets)
    _check_targets(targets, weight.shape[0])
    return LogprobEntropyOutput(*_CppHead.apply(hidden, None, weight, targets, temperature, block_v, chunk_n))
