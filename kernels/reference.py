"""Plain-torch formulas for the fused two-policy LM head: the oracle and a memory-bounded torch path.

Notation (see ../shared/reference/fused-head-math.md): logits a = h_o·Wᵀ/τ, b = h_m·Wᵀ/τ, p = softmax(a),
q = softmax(b), δ = a − b, y the sampled token.

    logprobs        = a_y − lse(a)
    logprobs_masked = b_y − lse(b)
    entropy         = lse(a) − E_p[a]
    entropy_masked  = lse(b) − E_q[b]
    kl              = KL(p ‖ q) = E_p[δ] − (lse(a) − lse(b))

Two implementations live here:

* ``papo_head_reference`` / ``logprob_entropy_reference`` materialize the full [N, V] logits and let autograd
  differentiate ``log_softmax``.  They run in float64 when given float64 and are the oracle for every backend.
* ``papo_head_chunked`` / ``logprob_entropy_chunked`` (the ``backend="torch"`` path) loop over token chunks,
  keep only ``chunk × V`` logits alive, save five floats per row for backward, and recompute the chunk's logits
  in backward to form the logit gradients in closed form:

    dA = g_lp·(1_y − p) − g_Ha·p·(a − E_p[a]) + g_KL·p·(δ − E_p[δ])
    dB = g_lq·(1_y − q) − g_Hb·q·(b − E_q[b]) + g_KL·(q − p)
    dh_o = dA·W/τ,  dh_m = dB·W/τ,  dW = (dAᵀ·h_o + dBᵀ·h_m)/τ

Compute dtype: float64 inputs stay float64; everything else (fp32, bf16, fp16) is computed in float32 — the
logits are never formed in bf16, whose spacing near |z| ≈ 16 is 0.125.  Outputs are float32 (float64 for
float64 inputs); gradients come back in the input dtypes.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


class PapoHeadOutput(NamedTuple):
    logprobs: torch.Tensor
    logprobs_masked: torch.Tensor
    entropy: torch.Tensor
    entropy_masked: torch.Tensor
    kl: torch.Tensor


class LogprobEntropyOutput(NamedTuple):
    logprobs: torch.Tensor
    entropy: torch.Tensor


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 inputs are upcast per chunk)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_inputs(hidden: torch.Tensor, hidden_masked: Optional[torch.Tensor], weight: torch.Tensor,
                 targets: torch.Tensor) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, d], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V, d] with d = {hidden.shape[1]}, got shape {tuple(weight.shape)}")
    if hidden_masked is not None and hidden_masked.shape != hidden.shape:
        raise ValueError(f"hidden_masked shape {tuple(hidden_masked.shape)} != hidden shape {tuple(hidden.shape)}")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets must be [N] = [{hidden.shape[0]}], got shape {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if weight.shape[0] == 0:
        raise ValueError("weight has 0 rows: under ZeRO-3 call the head where lm_head.weight is gathered")


# ---------------------------------------------------------------------------------------------------------------
# (a) materializing reference — the oracle
# ---------------------------------------------------------------------------------------------------------------
def _branch_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                      dtype: torch.dtype):
    logits = (hidden.to(dtype) @ weight.to(dtype).t()) / temperature      # [N, V]
    logp = F.log_softmax(logits, dim=-1)                                   # [N, V]
    lp = logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)         # [N]
    ent = -(logp.exp() * logp).sum(-1)                                     # [N]
    return logp, lp, ent


def papo_head_reference(hidden: torch.Tensor, hidden_masked: torch.Tensor, weight: torch.Tensor,
                        targets: torch.Tensor, temperature: float = 1.0) -> PapoHeadOutput:
    """Materializes both [N, V] logit matrices; differentiable by autograd; float64-capable."""
    check_inputs(hidden, hidden_masked, weight, targets)
    dtype = compute_dtype(hidden, hidden_masked, weight)
    logp, lp, ent = _branch_reference(hidden, weight, targets, temperature, dtype)
    logq, lq, ent_m = _branch_reference(hidden_masked, weight, targets, temperature, dtype)
    kl = (logp.exp() * (logp - logq)).sum(-1)                              # KL(p ‖ q)
    return PapoHeadOutput(lp, lq, ent, ent_m, kl)


def logprob_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              temperature: float = 1.0) -> LogprobEntropyOutput:
    check_inputs(hidden, None, weight, targets)
    _, lp, ent = _branch_reference(hidden, weight, targets, temperature, compute_dtype(hidden, weight))
    return LogprobEntropyOutput(lp, ent)


# ---------------------------------------------------------------------------------------------------------------
# (b) token-chunked torch path — bounded memory, closed-form backward by recomputation
# ---------------------------------------------------------------------------------------------------------------
# Logit bytes kept alive per chunk: ~6 [chunk, V] buffers in the compute dtype (a, b, p, q, dA, dB).
_CHUNK_BUDGET_BYTES = 256 * 2**20


def default_chunk_size(n_tokens: int, vocab: int, itemsize: int = 4) -> int:
    return max(1, min(n_tokens, _CHUNK_BUDGET_BYTES // (6 * vocab * itemsize)))


def _max_logsum(x):
    """Row max m and log Σ e^(x − m), so that lse = m + log s without rounding lse itself."""
    m = x.amax(dim=-1)
    return m, torch.log(torch.exp(x - m.unsqueeze(-1)).sum(-1))


def _chunk_forward(h_o, h_m, w, y, inv_t):
    """Outputs and saved row statistics for one token chunk.  h_* [c, d], w [V, d] (compute dtype), y [c].

    Entropy and KL are summed over log-probabilities (a − lse, small near the mode) rather than as
    lse − E_p[a], which cancels two numbers of size |logit| in fp32.
    """
    a = (h_o @ w.t()) * inv_t                                              # [c, V]
    m_a, ls_a = _max_logsum(a)                                             # lse = m + log s, kept split
    logp = (a - m_a.unsqueeze(-1)) - ls_a.unsqueeze(-1)
    p = torch.exp(logp)
    lp = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    ent = -(p * logp).sum(-1)                                              # H(p) = −Σ p·log p = lse − E_p[a]
    if h_m is None:
        return (lp, ent), (m_a, ls_a)
    b = (h_m @ w.t()) * inv_t
    m_b, ls_b = _max_logsum(b)
    logq = (b - m_b.unsqueeze(-1)) - ls_b.unsqueeze(-1)
    q = torch.exp(logq)
    lq = logq.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    ent_m = -(q * logq).sum(-1)
    kl = (p * (logp - logq)).sum(-1)                                       # KL(p‖q) = E_p[δ] − (lse_a − lse_b)
    return (lp, lq, ent, ent_m, kl), (m_a, ls_a, m_b, ls_b)


def _chunk_logit_grads(h_o, h_m, w, y, inv_t, stats, g):
    """dA (and dB) for one chunk, already multiplied by 1/τ.

    stats = (m_a, log s_a, H_a) or (m_a, log s_a, m_b, log s_b, H_a, H_b, KL) for the chunk's rows (lse = m + log s);
    g = upstream grads, each [c].
    Uses a − E_p[a] = log p + H(p) and δ − E_p[δ] = (log p − log q) − KL.
    """
    a = (h_o @ w.t()) * inv_t
    rows = torch.arange(a.shape[0], device=a.device)
    if h_m is None:
        m_a, ls_a, ent = (t.unsqueeze(-1) for t in stats)
        g_lp, g_ha = (t.unsqueeze(-1) for t in g)
        logp = (a - m_a) - ls_a
        p = torch.exp(logp)
        # dA = g_lp·(1_y − p) − g_Ha·p·(a − E_p[a])
        da = p * (-g_lp - g_ha * (logp + ent))
        da[rows, y] += g_lp.squeeze(-1)
        return da * inv_t, None
    m_a, ls_a, m_b, ls_b, ent, ent_m, kl = (t.unsqueeze(-1) for t in stats)
    g_lp, g_lq, g_ha, g_hb, g_kl = (t.unsqueeze(-1) for t in g)
    b = (h_m @ w.t()) * inv_t
    logp = (a - m_a) - ls_a
    logq = (b - m_b) - ls_b
    p = torch.exp(logp)
    q = torch.exp(logq)
    # dA = g_lp·(1_y − p) − g_Ha·p·(a − E_p[a]) + g_KL·p·(δ − E_p[δ])
    da = p * (-g_lp - g_ha * (logp + ent) + g_kl * ((logp - logq) - kl))
    da[rows, y] += g_lp.squeeze(-1)
    # dB = g_lq·(1_y − q) − g_Hb·q·(b − E_q[b]) + g_KL·(q − p)
    db = q * (-g_lq - g_hb * (logq + ent_m) + g_kl) - g_kl * p
    db[rows, y] += g_lq.squeeze(-1)
    return da * inv_t, db * inv_t


class _ChunkedHead(torch.autograd.Function):
    """Token-chunked fused head (one or two policies).

    Forward, per chunk of c tokens: a = h_o·Wᵀ/τ (and b = h_m·Wᵀ/τ) → outputs; saved per row: the row max m
    and log s (lse = m + log s; one rounded fp32 lse of size 120 would scale every p by 1 ± 4e-6) for each
    branch, and the outputs H_a, H_b, KL.  Backward recomputes the chunk's logits and forms
        dA = g_lp·(1_y − p) − g_Ha·p·(a − E_p[a]) + g_KL·p·(δ − E_p[δ])
        dB = g_lq·(1_y − q) − g_Hb·q·(b − E_q[b]) + g_KL·(q − p)
        dh_o = dA·W/τ, dh_m = dB·W/τ, dW = (dAᵀ·h_o + dBᵀ·h_m)/τ
    (branch b is not recomputed when none of its outputs receives gradient).  Peak extra memory ~ 6·c·V floats
    plus an fp32 copy of W when W is bf16/fp16.
    """

    @staticmethod
    def forward(ctx, hidden, hidden_masked, weight, targets, temperature, chunk_size):
        dtype = compute_dtype(hidden, weight, *([hidden_masked] if hidden_masked is not None else []))
        n = hidden.shape[0]
        two = hidden_masked is not None
        c = chunk_size or default_chunk_size(n, weight.shape[0], torch.finfo(dtype).bits // 8)
        inv_t = 1.0 / float(temperature)
        w = weight.to(dtype)
        y = targets.long()
        outs = [torch.empty(n, dtype=dtype, device=hidden.device) for _ in range(5 if two else 2)]
        lses = [torch.empty(n, dtype=dtype, device=hidden.device) for _ in range(4 if two else 2)]
        with torch.no_grad():
            for s in range(0, n, c):
                e = min(n, s + c)
                o, st = _chunk_forward(hidden[s:e].to(dtype), hidden_masked[s:e].to(dtype) if two else None,
                                       w, y[s:e], inv_t)
                for buf, val in zip(outs, o):
                    buf[s:e] = val
                for buf, val in zip(lses, st):
                    buf[s:e] = val
        # Saved per row: m_a, log s_a (, m_b, log s_b) and the outputs H_a (, H_b, KL) — nothing else.
        stats = lses + (outs[2:] if two else outs[1:])
        ctx.save_for_backward(hidden, hidden_masked if two else None, weight, y, *stats)
        ctx.two, ctx.inv_t, ctx.c, ctx.dtype = two, inv_t, c, dtype
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        hidden, hidden_masked, weight, y, *stats = ctx.saved_tensors
        two, inv_t, c, dtype = ctx.two, ctx.inv_t, ctx.c, ctx.dtype
        need_h, need_hm, need_w = ctx.needs_input_grad[0], two and ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if two and all(grads[i] is None for i in (1, 3, 4)):
            # branch b receives no gradient (logprobs_masked, entropy_masked, kl unused): one-branch backward
            two, need_hm, hidden_masked = False, False, None
            grads, stats = (grads[0], grads[2]), [stats[0], stats[1], stats[4]]   # (g_lp, g_Ha), (m_a, log s_a, H_a)
        n = hidden.shape[0]
        w = weight.to(dtype)
        g = [gg.to(dtype) if gg is not None else torch.zeros(n, dtype=dtype, device=hidden.device) for gg in grads]
        dh = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if need_h else None
        dhm = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if need_hm else None
        dw = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        for s in range(0, n, c):
            e = min(n, s + c)
            h_o = hidden[s:e].to(dtype)
            h_m = hidden_masked[s:e].to(dtype) if two else None
            da, db = _chunk_logit_grads(h_o, h_m, w, y[s:e], inv_t, [t[s:e] for t in stats],
                                        [gg[s:e] for gg in g])
            if need_h:
                dh[s:e] = da @ w
            if need_hm:
                dhm[s:e] = db @ w
            if need_w:
                dw.addmm_(da.t(), h_o)
                if two:
                    dw.addmm_(db.t(), h_m)
        return (dh.to(hidden.dtype) if need_h else None,
                dhm.to(hidden_masked.dtype) if need_hm else None,
                dw.to(weight.dtype) if need_w else None,
                None, None, None)


def _out_dtype(*tensors):
    return torch.float64 if compute_dtype(*tensors) == torch.float64 else torch.float32


def papo_head_chunked(hidden: torch.Tensor, hidden_masked: torch.Tensor, weight: torch.Tensor,
                      targets: torch.Tensor, temperature: float = 1.0,
                      chunk_size: Optional[int] = None) -> PapoHeadOutput:
    check_inputs(hidden, hidden_masked, weight, targets)
    outs = _ChunkedHead.apply(hidden, hidden_masked, weight, targets, temperature, chunk_size)
    return PapoHeadOutput(*outs)


def logprob_entropy_chunked(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            temperature: float = 1.0, chunk_size: Optional[int] = None) -> LogprobEntropyOutput:
    check_inputs(hidden, None, weight, targets)
    outs = _ChunkedHead.apply(hidden, None, weight, targets, temperature, chunk_size)
    return LogprobEntropyOutput(*outs)
