// Fused two-policy LM head on the CPU: ATen GEMMs per (token chunk × vocab block) tile, fused single-pass
// reductions over the vocabulary, backward by recomputation.  Never holds [N, V] logits.
//
// Notation (../shared/reference/fused-head-math.md): a = h_o·Wᵀ/τ, b = h_m·Wᵀ/τ, p = softmax(a), q = softmax(b),
// δ = a − b.  Per row, one online pass over the vocabulary keeps, for each branch,
//     m = running max,  s = Σ e^(x−m),  t = Σ e^(x−m)·(x−m)     (shifted: no cancellation against |m|)
// and for the pair  u = Σ e^(a−m_a)·δ.  When the max moves from m to m', s and u scale by e^(m−m') and
// t becomes e^(m−m')·(t + s·(m−m')).  Then
//     lse = m + log s,  log p(y) = (a_y − m_a) − log s_a,  H(p) = log s_a − t_a/s_a,
//     KL(p‖q) = u/s_a − (m_a − m_b) − (log s_a − log s_b).
// Saved for backward per row: m and log s per branch (lse is never rounded as one fp32 number: at |lse| ≈ 120
// its ulp would rescale every p by 1 ± 4e-6), plus the outputs H_a, H_b, KL.
//
// Backward, per tile, with the logits recomputed while the tile is in cache:
//     dA = g_lp·(1_y − p) − g_Ha·p·(log p + H_a) + g_KL·p·(log p − log q − KL)
//     dB = g_lq·(1_y − q) − g_Hb·q·(log q + H_b) + g_KL·(q − p)
// (a − E_p[a] = log p + H_a; δ − E_p[δ] = log p − log q − KL), written over the logits tile in place, scaled by
// 1/τ, and immediately multiplied into dh (+= G·W_blk) and dW_blk (+= Gᵀ·H).
//
// Pass plan (why the backward recomputes rather than storing anything): at N=2048, d=512, V=32768 one GEMM is
// ~0.5–0.7 s on the 2-core CPU and eager torch does 6 GEMMs + ~1.6 s of element-wise passes over [N, V].  Any
// scheme that avoids recomputation must keep a [N, V] tensor alive (≥ 128 MB even in bf16, beyond the 1/20
// memory budget, and bf16 logits break the 1e-5 accuracy), and precomputing the backward in the forward needs
// the upstream gradients (unknown) or 5 Jacobian GEMMs instead of 2.  So: forward 2 GEMM-equivalents, backward
// 2 (recompute) + 2 (dh) + 2 (dW) = 8 in total, with all element-wise work fused into one vectorized sweep per
// tile (2 exps per element pair), so it costs a few percent of a GEMM.  Both branches are stacked into one
// [2·Nc, d] operand so each tile is one GEMM call per product and one W block serves both branches; the vocab
// loop is inner, so dW_blk is written once per token chunk and stays in cache while it accumulates.

// Pick the widest vector ISA the compiler targets (-march=native); the Sleef exp/log that the AVX paths use
// are exported by libtorch_cpu.  The inline namespace gets our own name so nothing clashes with ATen's copies.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2 1
#endif
#define CPU_CAPABILITY papo_head_vec

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

using at::Tensor;
namespace vec = at::vec;

namespace {

// Tile = [2·chunk_n, block_v] logits (32 MB fp32 at the defaults).  Measured with this op on the shared 2-core
// EPYC at N=2048, d=512, V=32768 (min of 3, machine under load), forward / forward+backward in seconds:
//   (chunk_n, block_v) = (2048, 1024) 2.08 / 7.52   (1024, 2048) 2.14 / 7.58   (512, 4096) 2.22 / 7.64
//                        (2048, 2048) 1.80 / 6.79   (1024, 4096) 1.82 / 6.73
// i.e. what matters is the tile's size (MKL's per-call packing and thread fork amortized over more work); 8M
// elements is the knee.  (1024, 4096) keeps M = 2·1024 stacked rows per GEMM also when N is small.
constexpr int64_t kDefaultBlockV = 4096;   // vocab columns per tile
constexpr int64_t kDefaultChunkN = 1024;   // token rows per chunk (× 2 stacked branches)

template <typename T>
inline T neg_inf() { return -std::numeric_limits<T>::infinity(); }

// ---------------------------------------------------------------------------------------------------------------
// Forward tile: update the online accumulators of rows [r0, r1) from logits tile L (raw h·Wᵀ, not yet /τ).
// L: [R, vb] row-major, row i of branch a at L[i], of branch b at L[n_rows + i].
// acc: per row, [m_a, s_a, t_a, u, m_b, s_b, t_b] (7 × n_rows, structure of arrays).
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
struct Acc {
  T* m_a; T* s_a; T* t_a; T* u; T* m_b; T* s_b; T* t_b; T* y_a; T* y_b;
};

template <typename T>
void forward_tile(const T* L, int64_t ld, int64_t n_rows, int64_t vb, int64_t v0, const int64_t* y, T inv_t,
                  bool two, Acc<T> acc, int64_t r0, int64_t r1) {
  using V = vec::Vectorized<T>;
  constexpr int64_t W = V::size();
  const V vinv(inv_t);
  for (int64_t i = r0; i < r1; ++i) {
    const T* la = L + i * ld;
    const T* lb = two ? L + (n_rows + i) * ld : nullptr;
    // target logit, if it falls in this block
    const int64_t yi = y[i] - v0;
    if (yi >= 0 && yi < vb) {
      acc.y_a[i] = la[yi] * inv_t;
      if (two) acc.y_b[i] = lb[yi] * inv_t;
    }
    // block maxima (x/τ is monotone in x for τ > 0, so max the raw logits and scale once)
    V vma(neg_inf<T>()), vmb(neg_inf<T>());
    int64_t j = 0;
    for (; j + W <= vb; j += W) {
      vma = vec::maximum(vma, V::loadu(la + j));
      if (two) vmb = vec::maximum(vmb, V::loadu(lb + j));
    }
    T bma = vec::vec_reduce_all<T>([](const V& x, const V& z) { return vec::maximum(x, z); }, vma);
    T bmb = two ? vec::vec_reduce_all<T>([](const V& x, const V& z) { return vec::maximum(x, z); }, vmb) : T(0);
    for (; j < vb; ++j) {
      bma = std::max(bma, la[j]);
      if (two) bmb = std::max(bmb, lb[j]);
    }
    bma *= inv_t;
    bmb *= inv_t;
    // rescale the running accumulators when the max moves (first block: m = −inf, s = t = u = 0)
    const T m_a_old = acc.m_a[i], m_a = std::max(m_a_old, bma);
    if (acc.s_a[i] > T(0) && m_a > m_a_old) {
      const T c = std::exp(m_a_old - m_a);
      acc.t_a[i] = c * (acc.t_a[i] + acc.s_a[i] * (m_a_old - m_a));
      acc.s_a[i] *= c;
      acc.u[i] *= c;
    }
    acc.m_a[i] = m_a;
    T m_b = 0;
    if (two) {
      const T m_b_old = acc.m_b[i];
      m_b = std::max(m_b_old, bmb);
      if (acc.s_b[i] > T(0) && m_b > m_b_old) {
        const T c = std::exp(m_b_old - m_b);
        acc.t_b[i] = c * (acc.t_b[i] + acc.s_b[i] * (m_b_old - m_b));
        acc.s_b[i] *= c;
      }
      acc.m_b[i] = m_b;
    }
    // one sweep: s += e^(x−m), t += e^(x−m)·(x−m), u += e^(a−m_a)·(a − b)
    const V vm_a(m_a), vm_b(m_b);
    V vs_a(T(0)), vt_a(T(0)), vu(T(0)), vs_b(T(0)), vt_b(T(0));
    j = 0;
    for (; j + W <= vb; j += W) {
      const V a = V::loadu(la + j) * vinv;
      const V xa = a - vm_a;
      const V ea = xa.exp();
      vs_a = vs_a + ea;
      vt_a = vec::fmadd(ea, xa, vt_a);
      if (two) {
        const V b = V::loadu(lb + j) * vinv;
        const V xb = b - vm_b;
        const V eb = xb.exp();
        vs_b = vs_b + eb;
        vt_b = vec::fmadd(eb, xb, vt_b);
        vu = vec::fmadd(ea, a - b, vu);
      }
    }
    auto sum = [](const V& x) { return vec::vec_reduce_all<T>([](const V& p, const V& q) { return p + q; }, x); };
    T s_a = sum(vs_a), t_a = sum(vt_a), u = sum(vu), s_b = sum(vs_b), t_b = sum(vt_b);
    for (; j < vb; ++j) {
      const T a = la[j] * inv_t, xa = a - m_a, ea = std::exp(xa);
      s_a += ea;
      t_a += ea * xa;
      if (two) {
        const T b = lb[j] * inv_t, xb = b - m_b, eb = std::exp(xb);
        s_b += eb;
        t_b += eb * xb;
        u += ea * (a - b);
      }
    }
    acc.s_a[i] += s_a;
    acc.t_a[i] += t_a;
    if (two) {
      acc.u[i] += u;
      acc.s_b[i] += s_b;
      acc.t_b[i] += t_b;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward tile: overwrite logits tile L with the logit gradients (already × 1/τ) for rows [r0, r1).
// st: per-row [m_a, ls_a, m_b, ls_b, H_a, H_b, KL]; g: per-row upstream grads [g_lp, g_lq, g_Ha, g_Hb, g_KL].
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
struct Rows {
  const T* m_a; const T* ls_a; const T* m_b; const T* ls_b; const T* h_a; const T* h_b; const T* kl;
  const T* g_lp; const T* g_lq; const T* g_ha; const T* g_hb; const T* g_kl;
};

template <typename T>
void backward_tile(T* L, int64_t ld, int64_t n_rows, int64_t vb, int64_t v0, const int64_t* y, T inv_t,
                   bool two, bool do_a, bool do_b, Rows<T> r, int64_t r0, int64_t r1) {
  using V = vec::Vectorized<T>;
  constexpr int64_t W = V::size();
  const V vinv(inv_t);
  for (int64_t i = r0; i < r1; ++i) {
    T* la = L + i * ld;
    T* lb = two ? L + (n_rows + i) * ld : nullptr;
    const T m_a = r.m_a[i], ls_a = r.ls_a[i], h_a = r.h_a[i];
    const T g_lp = r.g_lp[i], g_ha = r.g_ha[i];
    const T m_b = two ? r.m_b[i] : T(0), ls_b = two ? r.ls_b[i] : T(0), h_b = two ? r.h_b[i] : T(0);
    const T kl = two ? r.kl[i] : T(0);
    const T g_lq = two ? r.g_lq[i] : T(0), g_hb = two ? r.g_hb[i] : T(0), g_kl = two ? r.g_kl[i] : T(0);
    // dA = p·(−g_lp − g_Ha·(log p + H_a) + g_KL·(log p − log q − KL))   [+ g_lp at y]
    // dB = q·(−g_lq − g_Hb·(log q + H_b) + g_KL) − g_KL·p               [+ g_lq at y]
    const V vm_a(m_a), vls_a(ls_a), vm_b(m_b), vls_b(ls_b);
    const V vca(-g_lp - g_ha * h_a - g_kl * kl), vga(g_kl - g_ha), vgk(g_kl);
    const V vcb(-g_lq - g_hb * h_b + g_kl), vgb(-g_hb);
    int64_t j = 0;
    if (!two) {
      for (; j + W <= vb; j += W) {
        const V lp = (V::loadu(la + j) * vinv - vm_a) - vls_a;
        const V p = lp.exp();
        (p * vec::fmadd(vga, lp, vca) * vinv).store(la + j);
      }
    } else {
      for (; j + W <= vb; j += W) {
        const V lp = (V::loadu(la + j) * vinv - vm_a) - vls_a;
        const V lq = (V::loadu(lb + j) * vinv - vm_b) - vls_b;
        const V p = lp.exp();
        const V q = lq.exp();
        // (g_KL − g_Ha)·log p − g_KL·log q + const  ==  −g_Ha·(log p + H_a) + g_KL·(log p − log q − KL) − g_lp
        const V ca = vec::fmadd(vga, lp, vca) - vgk * lq;
        if (do_a) (p * ca * vinv).store(la + j);
        if (do_b) ((q * vec::fmadd(vgb, lq, vcb) - vgk * p) * vinv).store(lb + j);
      }
    }
    for (; j < vb; ++j) {
      const T lp = (la[j] * inv_t - m_a) - ls_a, p = std::exp(lp);
      if (!two) {
        la[j] = p * ((g_kl - g_ha) * lp + (-g_lp - g_ha * h_a)) * inv_t;
        continue;
      }
      const T lq = (lb[j] * inv_t - m_b) - ls_b, q = std::exp(lq);
      if (do_a) la[j] = p * ((g_kl - g_ha) * lp - g_kl * lq + (-g_lp - g_ha * h_a - g_kl * kl)) * inv_t;
      if (do_b) lb[j] = (q * (-g_hb * lq + (-g_lq - g_hb * h_b + g_kl)) - g_kl * p) * inv_t;
    }
    const int64_t yi = y[i] - v0;
    if (yi >= 0 && yi < vb) {
      la[yi] += g_lp * inv_t;
      if (two) lb[yi] += g_lq * inv_t;
    }
  }
}

// The stacked operand [h_o; h_m] for token rows [n0, n1), upcast to the compute dtype.
Tensor stacked(const Tensor& h_o, const c10::optional<Tensor>& h_m, int64_t n0, int64_t n1, at::ScalarType ct) {
  Tensor a = h_o.slice(0, n0, n1).to(ct);
  if (!h_m.has_value()) return a.contiguous();
  return at::cat({a, h_m->slice(0, n0, n1).to(ct)}, 0);
}

int64_t grain(int64_t vb) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(vb, 1)); }

void check(const Tensor& h_o, const c10::optional<Tensor>& h_m, const Tensor& w, const Tensor& y) {
  TORCH_CHECK(h_o.device().is_cpu() && w.device().is_cpu() && y.device().is_cpu(),
              "papo_head_cpp: CPU tensors only");
  TORCH_CHECK(h_o.dim() == 2 && w.dim() == 2 && h_o.size(1) == w.size(1),
              "papo_head_cpp: hidden [N, d], weight [V, d]");
  TORCH_CHECK(y.dim() == 1 && y.size(0) == h_o.size(0) && y.scalar_type() == at::kLong,
              "papo_head_cpp: targets [N] int64");
  if (h_m.has_value()) TORCH_CHECK(h_m->sizes() == h_o.sizes(), "papo_head_cpp: hidden_masked shape != hidden shape");
  TORCH_CHECK(w.size(0) > 0, "papo_head_cpp: weight has 0 rows (ZeRO-3 partitioned? gather it first)");
}

at::ScalarType compute_type(const Tensor& h_o, const Tensor& w) {
  return (h_o.scalar_type() == at::kDouble || w.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

}  // namespace

// Returns (outputs [5 or 2, N], stats [4 or 2, N]); outputs rows: lp, lq, H_a, H_b, KL (two) or lp, H_a.
// stats rows: m_a, log s_a, m_b, log s_b (two) or m_a, log s_a.
std::vector<Tensor> papo_head_forward(const Tensor& h_o, const c10::optional<Tensor>& h_m, const Tensor& w,
                                      const Tensor& y, double inv_t_d, int64_t block_v, int64_t chunk_n) {
  check(h_o, h_m, w, y);
  const bool two = h_m.has_value();
  const int64_t n = h_o.size(0), V = w.size(0);
  const int64_t vb_max = block_v > 0 ? block_v : kDefaultBlockV;
  const int64_t cn = chunk_n > 0 ? chunk_n : kDefaultChunkN;
  const auto ct = compute_type(h_o, w);
  const Tensor yc = y.contiguous();
  const int64_t* yp = yc.data_ptr<int64_t>();
  auto opts = h_o.options().dtype(ct);
  Tensor acc = at::zeros({9, n}, opts);
  acc[0].fill_(-std::numeric_limits<double>::infinity());  // running maxima start at −inf, never 0
  acc[4].fill_(-std::numeric_limits<double>::infinity());
  Tensor tile = at::empty({(two ? 2 : 1) * std::min(n, cn), vb_max}, opts);
  AT_DISPATCH_FLOATING_TYPES(ct, "papo_head_forward", [&] {
    using T = scalar_t;
    const T inv_t = static_cast<T>(inv_t_d);
    T* A = acc.data_ptr<T>();
    for (int64_t n0 = 0; n0 < n; n0 += cn) {
      const int64_t n1 = std::min(n, n0 + cn), nr = n1 - n0;
      const Tensor H = stacked(h_o, h_m, n0, n1, ct);                                  // [R, d]
      Acc<T> a{A + 0 * n + n0, A + 1 * n + n0, A + 2 * n + n0, A + 3 * n + n0, A + 4 * n + n0,
               A + 5 * n + n0, A + 6 * n + n0, A + 7 * n + n0, A + 8 * n + n0};
      for (int64_t v0 = 0; v0 < V; v0 += vb_max) {
        const int64_t vb = std::min(V, v0 + vb_max) - v0;
        Tensor L = tile.narrow(0, 0, H.size(0)).narrow(1, 0, vb);
        at::mm_out(L, H, w.slice(0, v0, v0 + vb).to(ct).t());                          // [R, vb]
        const T* Lp = L.data_ptr<T>();
        const int64_t ld = L.stride(0);
        at::parallel_for(0, nr, grain(vb), [&](int64_t r0, int64_t r1) {
          forward_tile<T>(Lp, ld, nr, vb, v0, yp + n0, inv_t, two, a, r0, r1);
        });
      }
    }
  });
  // finalize: lse = m + log s; log p(y) = (a_y − m_a) − log s_a; H = log s − t/s; KL = u/s_a − Δm − Δlog s
  Tensor m_a = acc[0], s_a = acc[1], t_a = acc[2], u = acc[3], m_b = acc[4], s_b = acc[5], t_b = acc[6];
  Tensor ls_a = s_a.log();
  Tensor lp = (acc[7] - m_a) - ls_a;
  Tensor h_a = ls_a - t_a / s_a;
  if (!two) return {at::stack({lp, h_a}), at::stack({m_a, ls_a})};
  Tensor ls_b = s_b.log();
  Tensor lq = (acc[8] - m_b) - ls_b;
  Tensor h_b = ls_b - t_b / s_b;
  Tensor kl = u / s_a - (m_a - m_b) - (ls_a - ls_b);
  return {at::stack({lp, lq, h_a, h_b, kl}), at::stack({m_a, ls_a, m_b, ls_b})};
}

// grads: [5 or 2, N] upstream grads (zeros where unused); outs: the forward outputs (H_a, H_b, KL are read).
// need = (dh_o, dh_m, dW); do_a / do_b: whether branch a / b receives any logit gradient.
std::vector<Tensor> papo_head_backward(const Tensor& h_o, const c10::optional<Tensor>& h_m, const Tensor& w,
                                       const Tensor& y, const Tensor& outs, const Tensor& stats,
                                       const Tensor& grads, double inv_t_d, bool need_dh, bool need_dhm,
                                       bool need_dw, bool do_a, bool do_b, int64_t block_v, int64_t chunk_n) {
  check(h_o, h_m, w, y);
  const bool two = h_m.has_value();
  const int64_t n = h_o.size(0), V = w.size(0), d = h_o.size(1);
  const int64_t vb_max = block_v > 0 ? block_v : kDefaultBlockV;
  const int64_t cn = chunk_n > 0 ? chunk_n : kDefaultChunkN;
  const auto ct = compute_type(h_o, w);
  auto opts = h_o.options().dtype(ct);
  const Tensor yc = y.contiguous();
  const int64_t* yp = yc.data_ptr<int64_t>();
  const Tensor st = stats.to(ct).contiguous(), ou = outs.to(ct).contiguous(), gr = grads.to(ct).contiguous();
  // Branch b needs no recompute when it receives no gradient (no g_lq, g_Hb, g_KL).
  const bool use_b = two && do_b;
  const bool want_a = do_a && (need_dh || need_dw);
  const bool want_b = use_b && (need_dhm || need_dw);
  Tensor dh = need_dh ? at::zeros({n, d}, opts) : Tensor();
  Tensor dhm = (two && need_dhm) ? at::zeros({n, d}, opts) : Tensor();
  Tensor dw = need_dw ? at::zeros({V, d}, opts) : Tensor();
  if (!want_a && !want_b) return {dh, dhm, dw};
  Tensor tile = at::empty({(two ? 2 : 1) * std::min(n, cn), vb_max}, opts);
  AT_DISPATCH_FLOATING_TYPES(ct, "papo_head_backward", [&] {
    using T = scalar_t;
    const T inv_t = static_cast<T>(inv_t_d);
    const T* S = st.data_ptr<T>();
    const T* O = ou.data_ptr<T>();
    const T* G = gr.data_ptr<T>();
    for (int64_t n0 = 0; n0 < n; n0 += cn) {
      const int64_t n1 = std::min(n, n0 + cn), nr = n1 - n0;
      // branch b only when it has gradient (p is needed by dB's KL term, so a is always recomputed)
      const Tensor H = stacked(h_o, use_b ? h_m : c10::nullopt, n0, n1, ct);             // [R, d]
      Rows<T> r{};
      if (two) {
        r = Rows<T>{S + 0 * n + n0, S + 1 * n + n0, S + 2 * n + n0, S + 3 * n + n0,
                    O + 2 * n + n0, O + 3 * n + n0, O + 4 * n + n0,
                    G + 0 * n + n0, G + 1 * n + n0, G + 2 * n + n0, G + 3 * n + n0, G + 4 * n + n0};
      } else {
        r = Rows<T>{S + 0 * n + n0, S + 1 * n + n0, nullptr, nullptr, O + 1 * n + n0, nullptr, nullptr,
                    G + 0 * n + n0, nullptr, G + 1 * n + n0, nullptr, nullptr};
      }
      for (int64_t v0 = 0; v0 < V; v0 += vb_max) {
        const int64_t vb = std::min(V, v0 + vb_max) - v0;
        const Tensor Wb = w.slice(0, v0, v0 + vb).to(ct);                                 // [vb, d]
        Tensor L = tile.narrow(0, 0, H.size(0)).narrow(1, 0, vb);
        at::mm_out(L, H, Wb.t());                                                          // recompute logits
        T* Lp = L.data_ptr<T>();
        const int64_t ld = L.stride(0);
        at::parallel_for(0, nr, grain(vb), [&](int64_t r0, int64_t r1) {
          backward_tile<T>(Lp, ld, nr, vb, v0, yp + n0, inv_t, use_b, want_a, want_b, r, r0, r1);
        });
        // G = [dA; dB] (× 1/τ) is in L: dh += dA·W_blk, dh_m += dB·W_blk, dW_blk += dAᵀ·h_o + dBᵀ·h_m
        Tensor GA = L.narrow(0, 0, nr);
        if (need_dh && want_a) {
          Tensor o = dh.narrow(0, n0, nr);
          o.addmm_(GA, Wb);
        }
        if (need_dhm && want_b) {
          Tensor o = dhm.narrow(0, n0, nr);
          o.addmm_(L.narrow(0, nr, nr), Wb);
        }
        if (need_dw) {
          Tensor o = dw.narrow(0, v0, vb);
          if (want_a && want_b) o.addmm_(L.t(), H);
          else if (want_a) o.addmm_(GA.t(), H.narrow(0, 0, nr));
          else o.addmm_(L.narrow(0, nr, nr).t(), H.narrow(0, nr, nr));
        }
      }
    }
  });
  return {dh, dhm, dw};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused two-policy LM head (CPU): online reductions over vocab tiles, backward by recomputation";
  m.def("forward", &papo_head_forward, "fused head forward", py::arg("h_o"), py::arg("h_m"), py::arg("w"),
        py::arg("y"), py::arg("inv_t"), py::arg("block_v") = 0, py::arg("chunk_n") = 0);
  m.def("backward", &papo_head_backward, "fused head backward", py::arg("h_o"), py::arg("h_m"), py::arg("w"),
        py::arg("y"), py::arg("outs"), py::arg("stats"), py::arg("grads"), py::arg("inv_t"),
        py::arg("need_dh"), py::arg("need_dhm"), py::arg("need_dw"), py::arg("do_a"), py::arg("do_b"),
        py::arg("block_v") = 0, py::arg("chunk_n") = 0);
  m.def("vector_width", [] { return static_cast<int64_t>(vec::Vectorized<float>::size()); },
        "float lanes of the compiled vector path (16 = AVX-512, 8 = AVX2)");
}
