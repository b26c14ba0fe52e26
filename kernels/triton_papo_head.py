"""Triton backend of the fused two-policy LM head.

Forward: one kernel computes both branches' logit tiles from the same W tile (a = h_o·Wᵀ/τ, b = h_m·Wᵀ/τ via two
tl.dot per K step, fp32 accumulators) and folds them into per-row online accumulators in one pass over its vocab
range; the vocab is split over a second grid axis so that N/BLOCK_N row blocks still fill the GPU, and the few
per-split partials are merged in torch.  Backward: one kernel recomputes the logit tiles and writes the logit
gradients [dA; dB] of a token chunk (input dtype); cuBLAS then forms dh = G·W and dW += Gᵀ·H.

Runs compiled on CUDA, and in the interpreter (TRITON_INTERPRET=1, set before triton is imported) on CPU tensors;
the interpreter multiplies bf16 tiles wrongly in tl.dot, so tiles are cast to fp32 there (DOT_F32).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .reference import LogprobEntropyOutput, PapoHeadOutput, check_inputs

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ================================================================================================================
# kernels
# ================================================================================================================
@triton.jit
def _logit_tiles(h_rows, hm_rows, w_rows, row_ok, col_ok, D,
                 TWO: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """Raw logit tiles h_o·Wᵀ and h_m·Wᵀ, [BLOCK_N, BLOCK_V] fp32, for one row block and one vocab block;
    each W tile loaded per K step serves both branches."""
    acc_a = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    acc_b = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        ho = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT_F32:
            w = w.to(tl.float32)
            ho = ho.to(tl.float32)
        acc_a = tl.dot(ho, tl.trans(w), acc_a, input_precision=PRECISION)
        if TWO:
            hm = tl.load(hm_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if DOT_F32:
                hm = hm.to(tl.float32)
            acc_b = tl.dot(hm, tl.trans(w), acc_b, input_precision=PRECISION)
    return acc_a, acc_b


@triton.jit
def _papo_head_fwd_kernel(
    h_ptr,       # [N, D] hidden states of the original branch
    hm_ptr,      # [N, D] hidden states of the masked branch (ignored when not TWO)
    w_ptr,       # [V, D] lm_head weight
    y_ptr,       # [N] int64 sampled tokens
    part_ptr,    # [SPLIT, 9, N] fp32 partial row accumulators: m_a, s_a, t_a, u, m_b, s_b, t_b, a_y, b_y
    N, V, D,
    stride_h, stride_hm, stride_w,
    inv_t,       # 1 / temperature
    V_PER_SPLIT,  # vocab columns per program along grid axis 1 (a multiple of BLOCK_V)
    TWO: tl.constexpr,
    DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    # running maxima start at −inf (never 0: all logits may be far below 0)
    m_a = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s_a = tl.zeros((BLOCK_N,), tl.float32)
    t_a = tl.zeros((BLOCK_N,), tl.float32)
    u = tl.zeros((BLOCK_N,), tl.float32)
    m_b = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s_b = tl.zeros((BLOCK_N,), tl.float32)
    t_b = tl.zeros((BLOCK_N,), tl.float32)
    a_y = tl.zeros((BLOCK_N,), tl.float32)
    b_y = tl.zeros((BLOCK_N,), tl.float32)
    v_lo = pid_s * V_PER_SPLIT
    v_hi = tl.minimum(V, v_lo + V_PER_SPLIT)
    h_rows = h_ptr + rows[:, None] * stride_h
    hm_rows = hm_ptr + rows[:, None] * stride_hm
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w      # V·D may exceed 2^31
        acc_a, acc_b = _logit_tiles(h_rows, hm_rows, w_rows, row_ok, col_ok, D, TWO, DOT_F32, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
        # out-of-range vocab columns are −inf logits: they add e^−inf = 0, never e^0
        a = tl.where(col_ok[None, :], acc_a * inv_t, float("-inf"))
        is_y = cols[None, :] == y[:, None]
        a_y += tl.sum(tl.where(is_y, a, 0.0), axis=1)
        # online update: s = Σ e^(a−m), t = Σ e^(a−m)·(a−m); when m moves to m', s ← e^(m−m')·s and
        # t ← e^(m−m')·(t + s·(m−m'))
        m_new = tl.maximum(m_a, tl.max(a, axis=1))
        scale = tl.exp(m_a - m_new)
        t_a = scale * (t_a + s_a * (tl.where(s_a > 0, m_a, m_new) - m_new))   # (no 0·(−inf) on the first tile)
        s_a = scale * s_a
        u = scale * u
        x = a - m_new[:, None]
        e = tl.exp(x)                                     # 0 on out-of-range columns
        s_a += tl.sum(e, axis=1)
        t_a += tl.sum(e * tl.where(col_ok[None, :], x, 0.0), axis=1)
        m_a = m_new
        if TWO:
            b = tl.where(col_ok[None, :], acc_b * inv_t, float("-inf"))
            b_y += tl.sum(tl.where(is_y, b, 0.0), axis=1)
            # u = Σ e^(a−m_a)·(a − b): E_p[δ] accumulated directly, never as E_p[a] − E_p[b]
            u += tl.sum(e * tl.where(col_ok[None, :], (acc_a - acc_b) * inv_t, 0.0), axis=1)
            mb_new = tl.maximum(m_b, tl.max(b, axis=1))
            scale_b = tl.exp(m_b - mb_new)
            t_b = scale_b * (t_b + s_b * (tl.where(s_b > 0, m_b, mb_new) - mb_new))
            s_b = scale_b * s_b
            xb = b - mb_new[:, None]
            eb = tl.exp(xb)
            s_b += tl.sum(eb, axis=1)
            t_b += tl.sum(eb * tl.where(col_ok[None, :], xb, 0.0), axis=1)
            m_b = mb_new
    base = part_ptr + pid_s * 9 * N + rows
    tl.store(base + 0 * N, m_a, mask=row_ok)
    tl.store(base + 1 * N, s_a, mask=row_ok)
    tl.store(base + 2 * N, t_a, mask=row_ok)
    tl.store(base + 3 * N, u, mask=row_ok)
    tl.store(base + 4 * N, m_b, mask=row_ok)
    tl.store(base + 5 * N, s_b, mask=row_ok)
    tl.store(base + 6 * N, t_b, mask=row_ok)
    tl.store(base + 7 * N, a_y, mask=row_ok)
    tl.store(base + 8 * N, b_y, mask=row_ok)


@triton.jit
def _papo_head_bwd_kernel(
    h_ptr,       # [C, D] original-branch hidden states of this token chunk
    hm_ptr,      # [C, D] masked-branch hidden states of this chunk (ignored when not TWO)
    w_ptr,       # [V, D] lm_head weight
    y_ptr,       # [C] int64 sampled tokens
    st_ptr,      # [7, stride_st] fp32 row stats: m_a, log s_a, m_b, log s_b, H_a, H_b, KL
    g_ptr,       # [5, stride_g] fp32 upstream grads: g_lp, g_lq, g_Ha, g_Hb, g_KL
    ga_ptr,      # [C, V] out: dA/τ (input dtype)
    gb_ptr,      # [C, V] out: dB/τ (ignored when not TWO)
    C, V, D,
    stride_h, stride_hm, stride_w, stride_st, stride_g, stride_ga, stride_gb,
    inv_t,
    TWO: tl.constexpr,
    DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < C
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    h_rows = h_ptr + rows[:, None] * stride_h
    hm_rows = hm_ptr + rows[:, None] * stride_hm
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w          # V·D may exceed 2^31
    acc_a, acc_b = _logit_tiles(h_rows, hm_rows, w_rows, row_ok, col_ok, D, TWO, DOT_F32, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    is_y = cols[None, :] == y[:, None]
    m_a = tl.load(st_ptr + 0 * stride_st + rows, mask=row_ok, other=0.0)
    ls_a = tl.load(st_ptr + 1 * stride_st + rows, mask=row_ok, other=0.0)
    h_a = tl.load(st_ptr + 4 * stride_st + rows, mask=row_ok, other=0.0)
    g_lp = tl.load(g_ptr + 0 * stride_g + rows, mask=row_ok, other=0.0)
    g_ha = tl.load(g_ptr + 2 * stride_g + rows, mask=row_ok, other=0.0)
    # log p = (a − m_a) − log s_a  (lse kept split: one rounded fp32 lse would rescale every p);
    # out-of-range columns get p = q = 0 and finite log p = log q = 0 (no inf·0 in lanes that are not stored)
    out_ok = row_ok[:, None] & col_ok[None, :]
    lp = tl.where(out_ok, (acc_a * inv_t - m_a[:, None]) - ls_a[:, None], 0.0)
    p = tl.where(out_ok, tl.exp(lp), 0.0)
    if TWO:
        m_b = tl.load(st_ptr + 2 * stride_st + rows, mask=row_ok, other=0.0)
        ls_b = tl.load(st_ptr + 3 * stride_st + rows, mask=row_ok, other=0.0)
        h_b = tl.load(st_ptr + 5 * stride_st + rows, mask=row_ok, other=0.0)
        kl = tl.load(st_ptr + 6 * stride_st + rows, mask=row_ok, other=0.0)
        g_lq = tl.load(g_ptr + 1 * stride_g + rows, mask=row_ok, other=0.0)
        g_hb = tl.load(g_ptr + 3 * stride_g + rows, mask=row_ok, other=0.0)
        g_kl = tl.load(g_ptr + 4 * stride_g + rows, mask=row_ok, other=0.0)
        lq = tl.where(out_ok, (acc_b * inv_t - m_b[:, None]) - ls_b[:, None], 0.0)
        q = tl.where(out_ok, tl.exp(lq), 0.0)
        # dA = g_lp·(1_y − p) − g_Ha·p·(a − E_p[a]) + g_KL·p·(δ − E_p[δ]),
        #   with a − E_p[a] = log p + H_a and δ − E_p[δ] = log p − log q − KL
        da = p * (-g_lp[:, None] - g_ha[:, None] * (lp + h_a[:, None]) + g_kl[:, None] * (lp - lq - kl[:, None]))
        # dB = g_lq·(1_y − q) − g_Hb·q·(b − E_q[b]) + g_KL·(q − p)
        db = q * (-g_lq[:, None] - g_hb[:, None] * (lq + h_b[:, None]) + g_kl[:, None]) - g_kl[:, None] * p
        db = tl.where(is_y, db + g_lq[:, None], db)
        gb_tile = gb_ptr + rows.to(tl.int64)[:, None] * stride_gb + cols[None, :]
        tl.store(gb_tile, (db * inv_t).to(gb_ptr.dtype.element_ty), mask=out_ok)
    else:
        # dA = g_lp·(1_y − p) − g_Ha·p·(a − E_p[a])
        da = p * (-g_lp[:, None] - g_ha[:, None] * (lp + h_a[:, None]))
    da = tl.where(is_y, da + g_lp[:, None], da)
    ga_tile = ga_ptr + rows.to(tl.int64)[:, None] * stride_ga + cols[None, :]
    tl.store(ga_tile, (da * inv_t).to(ga_ptr.dtype.element_ty), mask=out_ok)


# ================================================================================================================
# launchers
# ================================================================================================================
# CUDA tile shapes (BLOCK_N, BLOCK_V, BLOCK_K, num_warps, num_stages) per (kernel, two branches, 16-bit inputs).
# Two-branch bf16 entries were picked by benchmarks/kernels_gpu_tune.py on an H100 80GB HBM3 at N=8192, d=3584,
# V=152064 (forward kernel + split merge; backward = logit-gradient kernel + cuBLAS dh/dW), ms:
#   (64,128,64,8,3) 57.4 / 104.1   (64,128,64,4,3) 44.7 / 98.1   (64,256,64,8,3) 37.2 / 100.5
#   (128,128,64,8,3) 40.9 / 100.7  (128,64,64,8,3) 70.0 / 116.6  (64,128,128,8,2) 64.2 / 118.6
# (one bf16 cuBLAS GEMM of that size: 14.3 ms, so the forward runs at ~480 TFLOP/s against cuBLAS's 625).
# The backward is dominated by its four cuBLAS GEMM-equivalents, so its tile matters little.  Single-branch and
# fp32 entries are untuned (fp32 halves BLOCK_K for shared memory; they are correct, see the CUDA tests).
CUDA_CONFIGS = {
    ("fwd", True, True): (64, 256, 64, 8, 3),
    ("bwd", True, True): (64, 128, 64, 4, 3),
    ("fwd", False, True): (128, 128, 64, 8, 3),
    ("bwd", False, True): (128, 128, 64, 8, 3),
    ("fwd", True, False): (64, 128, 32, 8, 3),
    ("bwd", True, False): (64, 128, 32, 8, 3),
    ("fwd", False, False): (128, 128, 32, 8, 3),
    ("bwd", False, False): (128, 128, 32, 8, 3),
}


def _config(x: torch.Tensor, two: bool, kind: str):
    """Tile shapes for kernel ``kind`` ("fwd" | "bwd").  The interpreter uses the smallest tiles tl.dot accepts
    (16) on N and 128 vocab columns, so V = 1000 leaves a ragged tail tile."""
    if INTERPRET or not x.is_cuda:
        return 16, 128, 32, 4, 1
    return CUDA_CONFIGS[(kind, two, x.dtype in (torch.bfloat16, torch.float16))]


def _dot_args(x: torch.Tensor):
    """(DOT_F32, PRECISION).  bf16/fp16 inputs: tensor-core dots with fp32 accumulation (the precision flag only
    matters for fp32 operands).  fp32 inputs: "tf32x3" on CUDA (three TF32 products, ~fp32 accuracy on tensor
    cores; plain TF32 would break the 1e-5 bound), "ieee" in the interpreter.  The interpreter's bf16 tl.dot is
    wrong, so there the tiles are cast to fp32 first (DOT_F32)."""
    emulated = INTERPRET or not x.is_cuda
    if x.dtype == torch.float32:
        return False, "ieee" if emulated else "tf32x3"
    return emulated, "ieee" if emulated else "tf32"


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def papo_head_forward(h, hm, w, y, inv_t):
    """Returns (outs [5 or 2, N] fp32, stats [4 or 2, N] fp32: m_a, log s_a (, m_b, log s_b))."""
    n, d = h.shape
    v = w.shape[0]
    two = hm is not None
    bn, bv, bk, warps, stages = _config(h, two, "fwd")
    row_blocks = triton.cdiv(n, bn)
    # enough programs to fill the GPU: split the vocab over grid axis 1 when N/BLOCK_N is small
    split = max(1, min(triton.cdiv(v, bv), triton.cdiv(4 * _num_sms(h.device), row_blocks)))
    v_per_split = triton.cdiv(triton.cdiv(v, split), bv) * bv
    split = triton.cdiv(v, v_per_split)
    part = torch.empty(split, 9, n, dtype=torch.float32, device=h.device)
    dot_f32, prec = _dot_args(h)
    hm_ = hm if two else h
    _papo_head_fwd_kernel[(row_blocks, split)](
        h, hm_, w, y, part, n, v, d, h.stride(0), hm_.stride(0), w.stride(0), inv_t, v_per_split,
        TWO=two, DOT_F32=dot_f32, PRECISION=prec, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk,
        num_warps=warps, num_stages=stages,
    )
    # merge the vocab splits: M = max_s m_s, s = Σ e^(m_s−M)·s_s, t = Σ e^(m_s−M)·(t_s + s_s·(m_s − M))
    def merge(m, s, t, extra=None):
        mx = m.max(0).values
        c = torch.exp(m - mx)
        s_tot = (c * s).sum(0)
        t_tot = (c * (t + s * (m - mx))).sum(0)
        return mx, s_tot, t_tot, (None if extra is None else (c * extra).sum(0))

    m_a, s_a, t_a, u = merge(part[:, 0], part[:, 1], part[:, 2], part[:, 3])
    ls_a = torch.log(s_a)
    a_y = part[:, 7].sum(0)
    lp = (a_y - m_a) - ls_a
    h_a = ls_a - t_a / s_a                                   # H = log s − t/s
    if not two:
        return torch.stack([lp, h_a]), torch.stack([m_a, ls_a])
    m_b, s_b, t_b, _ = merge(part[:, 4], part[:, 5], part[:, 6])
    ls_b = torch.log(s_b)
    lq = (part[:, 8].sum(0) - m_b) - ls_b
    h_b = ls_b - t_b / s_b
    kl = u / s_a - (m_a - m_b) - (ls_a - ls_b)               # KL = E_p[δ] − (lse_a − lse_b)
    return torch.stack([lp, lq, h_a, h_b, kl]), torch.stack([m_a, ls_a, m_b, ls_b])


# Logit-gradient buffer per token chunk: [2·C, V] in the input dtype, at most this many bytes.
_BWD_BUFFER_BYTES = 1 << 30


def papo_head_backward(h, hm, w, y, st7, g5, inv_t, need_h, need_hm, need_w, two_grad):
    """dh, dhm, dW given row stats st7 [7, N] and upstream grads g5 [5, N] (fp32).

    two_grad: branch b receives gradient (else only branch a is recomputed).  Per token chunk: the kernel writes
    G = [dA; dB]/τ, then dh = G_a·W, dh_m = G_b·W, dW += Gᵀ·[h_o; h_m] on cuBLAS (fp32 accumulation inside).
    """
    n, d = h.shape
    v = w.shape[0]
    two = hm is not None and two_grad
    nb = 2 if two else 1
    bn, bv, bk, warps, stages = _config(h, two, "bwd")
    itemsize = h.element_size()
    c = max(bn, min(n, (_BWD_BUFFER_BYTES // (nb * v * itemsize)) // bn * bn))
    dh = torch.empty_like(h) if need_h else None
    dhm = torch.zeros_like(hm) if (hm is not None and need_hm) else None
    dw = None
    dw_acc = None
    n_chunks = triton.cdiv(n, c)
    if need_w and n_chunks > 1 and w.dtype != torch.float32:
        dw_acc = torch.zeros(w.shape, dtype=torch.float32, device=w.device)   # fp32 accumulation across chunks
    dot_f32, prec = _dot_args(h)
    G = torch.empty(nb * min(c, n), v, dtype=h.dtype, device=h.device)
    for c0 in range(0, n, c):
        c1 = min(n, c0 + c)
        cc = c1 - c0
        ga = G[:cc]
        gb = G[cc:2 * cc] if two else ga
        hc = h[c0:c1]
        hmc = hm[c0:c1] if two else hc
        grid = (triton.cdiv(cc, bn), triton.cdiv(v, bv))
        _papo_head_bwd_kernel[grid](
            hc, hmc, w, y[c0:c1], st7[:, c0:], g5[:, c0:], ga, gb, cc, v, d,
            hc.stride(0), hmc.stride(0), w.stride(0), st7.stride(0), g5.stride(0), ga.stride(0), gb.stride(0),
            inv_t, TWO=two, DOT_F32=dot_f32, PRECISION=prec, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk,
            num_warps=warps, num_stages=stages,
        )
        if need_h:
            torch.mm(ga, w, out=dh[c0:c1])
        if dhm is not None and two:
            torch.mm(gb, w, out=dhm[c0:c1])
        if need_w:
            gs = G[:nb * cc]
            hs = torch.cat([hc, hmc]) if two else hc
            if dw_acc is not None:
                dw_acc += torch.mm(gs.t(), hs)
            elif dw is None:
                dw = torch.mm(gs.t(), hs)
            else:
                dw.addmm_(gs.t(), hs)
    if dw_acc is not None:
        dw = dw_acc.to(w.dtype)
    return dh, dhm, dw


# ================================================================================================================
# autograd
# ================================================================================================================
class TritonPapoHead(torch.autograd.Function):
    """Fused two-policy (or single-policy) head; same math as ``reference.papo_head_reference``:

        a = h_o·Wᵀ/τ, b = h_m·Wᵀ/τ, p = softmax(a), q = softmax(b)
        logprobs = log_softmax(a)[y], logprobs_masked = log_softmax(b)[y]
        entropy = −Σ p·log p, entropy_masked = −Σ q·log q, kl = Σ p·(log p − log q)

    Backward (logits recomputed per tile):
        dA = g_lp·(1_y − p) − g_Ha·p·(a − E_p[a]) + g_KL·p·(δ − E_p[δ])
        dB = g_lq·(1_y − q) − g_Hb·q·(b − E_q[b]) + g_KL·(q − p)
        dh_o = dA·W/τ, dh_m = dB·W/τ, dW = (dAᵀ·h_o + dBᵀ·h_m)/τ
    """

    @staticmethod
    def forward(ctx, hidden, hidden_masked, weight, targets, temperature):
        two = hidden_masked is not None
        h = hidden.contiguous()
        hm = hidden_masked.contiguous() if two else None
        w = weight.contiguous()
        if hm is not None and hm.dtype != h.dtype or w.dtype != h.dtype:
            raise ValueError("triton backend: hidden, hidden_masked and weight must share one dtype")
        if h.dtype == torch.float64:
            raise ValueError("triton backend: float64 is not supported (use backend='torch' for float64)")
        y = targets.long().contiguous()
        inv_t = 1.0 / float(temperature)
        outs, stats = papo_head_forward(h, hm, w, y, inv_t)
        ctx.save_for_backward(h, hm, w, y, outs, stats)
        ctx.two, ctx.inv_t = two, inv_t
        ctx.set_materialize_grads(False)
        return tuple(outs.unbind(0))

    @staticmethod
    def backward(ctx, *grads):
        h, hm, w, y, outs, stats = ctx.saved_tensors
        two = ctx.two
        n = h.shape[0]
        if all(g is None for g in grads):
            return None, None, None, None, None
        zero = torch.zeros(n, dtype=torch.float32, device=h.device)
        if two:
            g = [gg.float() if gg is not None else zero for gg in grads]
            st7 = torch.stack([stats[0], stats[1], stats[2], stats[3], outs[2], outs[3], outs[4]])
            two_grad = any(grads[i] is not None for i in (1, 3, 4))
        else:
            g = [grads[0].float() if grads[0] is not None else zero, zero,
                 grads[1].float() if grads[1] is not None else zero, zero, zero]
            st7 = torch.stack([stats[0], stats[1], zero, zero, outs[1], zero, zero])
            two_grad = False
        g5 = torch.stack(g).contiguous()
        need_h, need_hm, need_w = ctx.needs_input_grad[0], two and ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dh, dhm, dw = papo_head_backward(h, hm, w, y, st7.contiguous(), g5, ctx.inv_t, need_h, need_hm, need_w,
                                         two_grad)
        return dh, dhm, dw, None, None


def _check_device(x: torch.Tensor):
    if not x.is_cuda and not INTERPRET:
        raise RuntimeError("triton backend needs CUDA tensors (or TRITON_INTERPRET=1 set before importing triton)")


def papo_head_triton(hidden, hidden_masked, weight, targets, temperature=1.0) -> PapoHeadOutput:
    check_inputs(hidden, hidden_masked, weight, targets)
    _check_device(hidden)
    return PapoHeadOutput(*TritonPapoHead.apply(hidden, hidden_masked, weight, targets, temperature))


def logprob_entropy_triton(hidden, weight, targets, temperature=1.0) -> LogprobEntropyOutput:
    check_inputs(hidden, None, weight, targets)
    _check_device(hidden)
    return LogprobEntropyOutput(*TritonPapoHead.apply(hidden, None, weight, targets, temperature))
