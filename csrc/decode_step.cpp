// A decode step's two CPU ops for the native rollout, fp32: its attention (papo_engine/rollout/decoder.py) and its
// keyed sampling (papo_engine/rollout/sampling.py).
//
// decode_attention —
// For each prompt slot G and KV head k (one task each, in parallel), over the rows r that answer that prompt:
//   1. rotary embedding of each row's new query heads k·g … k·g + g − 1 (g = query heads per KV head) and of its
//      new key head k: x·cos + rotate_half(x)·sin, rotate_half(x) = (−x₂, x₁) — as Qwen2.5-VL computes it;
//   2. each row's new key and value written to its generated cache at `slot`;
//   3. for each row and query head: softmax over the prompt's slots j (`prompt_bias` 0, or −inf on left padding)
//      and the row's generated slots 0..slot of  scale·q·key_j + bias_j,  and the output Σ_j p_j·value_j.
// A prompt key or value is read once per task for all its rows' heads (the prompt is most of the context, and
// the n rows of a prompt share it), a generated one once for its row's g heads; scores stay in cache.
// The torch reference is TextDecoder._attention (tests/test_native_rollout.py compares them). Why a kernel: in
// torch, a decode step's attention at a few rows is ~25 tensor operations per layer around small batched
// matrix products whose M is g (2 here); this pass costs ~1/3 of their time on the 2-core CPU.

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2 1
#endif
#define CPU_CAPABILITY papo_decode_vec

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

inline float dot(const float* a, const float* b, int64_t n) {
  using V = vec::Vectorized<float>;
  constexpr int64_t W = V::size();
  V acc(0.f);
  int64_t i = 0;
  for (; i + W <= n; i += W) acc = vec::fmadd(V::loadu(a + i), V::loadu(b + i), acc);
  float s = vec::vec_reduce_all<float>([](const V& x, const V& y) { return x + y; }, acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float* y, float a, const float* x, int64_t n) {  // y += a·x
  using V = vec::Vectorized<float>;
  constexpr int64_t W = V::size();
  const V va(a);
  int64_t i = 0;
  for (; i + W <= n; i += W) vec::fmadd(va, V::loadu(x + i), V::loadu(y + i)).store(y + i);
  for (; i < n; ++i) y[i] += a * x[i];
}

inline void rotate(const float* x, const float* cos, const float* sin, float* out, int64_t hd) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; ++i) {
    out[i] = x[i] * cos[i] - x[i + half] * sin[i];
    out[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
  }
}

// softmax of s[0..L) in place (−inf entries → 0); returns the sum of the exponentials (the normalizer)
inline float exp_shifted(float* s, int64_t L) {
  using V = vec::Vectorized<float>;
  constexpr int64_t W = V::size();
  V vm(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + W <= L; j += W) vm = vec::maximum(vm, V::loadu(s + j));
  float m = vec::vec_reduce_all<float>([](const V& x, const V& y) { return vec::maximum(x, y); }, vm);
  for (; j < L; ++j) m = std::max(m, s[j]);
  const V shift(m);
  V vsum(0.f);
  for (j = 0; j + W <= L; j += W) {
    const V e = (V::loadu(s + j) - shift).exp();
    e.store(s + j);
    vsum = vsum + e;
  }
  float sum = vec::vec_reduce_all<float>([](const V& x, const V& y) { return x + y; }, vsum);
  for (; j < L; ++j) {
    s[j] = std::exp(s[j] - m);
    sum += s[j];
  }
  return sum;
}

}  // namespace

// qkv [rows, (H + 2·KV)·hd]: this step's query heads, then key heads, then value heads (the output of one matrix
// product), before the rotary embedding; cos / sin [rows, hd].
// prompt_keys / prompt_values [G, KV, P, hd], prompt_bias [G, P] (float32), row_group [rows] (int64, < G).
// keys / values [R ≥ rows, KV, T, hd]: row r's generated slots; slot < T. Returns the attention output [rows, H·hd].
Tensor decode_attention(const Tensor& qkv, int64_t H, const Tensor& cos, const Tensor& sin,
                        const Tensor& prompt_keys, const Tensor& prompt_values, const Tensor& prompt_bias,
                        const Tensor& row_group, Tensor keys, Tensor values, int64_t slot, double scale) {
  for (const Tensor* t : std::initializer_list<const Tensor*>{&qkv, &cos, &sin, &prompt_keys, &prompt_values,
                                                               &prompt_bias, &keys, &values}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(),
                "decode_attention: float32, contiguous CPU tensors");
  }
  TORCH_CHECK(row_group.scalar_type() == at::kLong && row_group.is_contiguous(), "row_group: contiguous int64");
  const int64_t rows = qkv.size(0), KV = keys.size(1), hd = keys.size(3);
  const int64_t P = prompt_keys.size(2), T = keys.size(2), stride = qkv.size(1);
  TORCH_CHECK(H % KV == 0 && hd % 2 == 0 && stride == (H + 2 * KV) * hd && keys.size(0) >= rows && 0 <= slot &&
              slot < T && row_group.size(0) == rows && cos.size(0) == rows, "decode_attention: shapes");
  const int64_t g = H / KV, L = P + slot + 1;
  const float fscale = static_cast<float>(scale);
  Tensor out = at::empty({rows, H * hd}, qkv.options());
  const float* qp = qkv.data_ptr<float>();  // row r: query head h at r·stride + h·hd, key head k at (H + k)·hd, ...
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  const float *pk = prompt_keys.data_ptr<float>(), *pv = prompt_values.data_ptr<float>();
  const float* pb = prompt_bias.data_ptr<float>();
  const int64_t* grp = row_group.data_ptr<int64_t>();
  float *kc = keys.data_ptr<float>(), *vc = values.data_ptr<float>(), *op = out.data_ptr<float>();
  // the rows of each prompt slot (spare rows of a bucket size sit with prompt slot 0: computed, ignored)
  int64_t G = 0;
  for (int64_t r = 0; r < rows; ++r) G = std::max(G, grp[r] + 1);
  std::vector<std::vector<int64_t>> members(G);
  for (int64_t r = 0; r < rows; ++r) members[grp[r]].push_back(r);
  at::parallel_for(0, G * KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qr, scores, norm;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t group = task / KV, k = task % KV;
      const std::vector<int64_t>& mine = members[group];
      const int64_t m = static_cast<int64_t>(mine.size());
      if (m == 0) continue;
      const int64_t heads = m * g;  // query (row, head) pairs of the task: row i's head h is pair i·g + h
      qr.resize(heads * hd);
      scores.resize(heads * L);
      norm.resize(heads);
      for (int64_t i = 0; i < m; ++i) {
        const int64_t r = mine[i];
        const float *c = cp + r * hd, *s = sp + r * hd;
        const float* row = qp + r * stride;
        for (int64_t h = 0; h < g; ++h) rotate(row + (k * g + h) * hd, c, s, qr.data() + (i * g + h) * hd, hd);
        rotate(row + (H + k) * hd, c, s, kc + ((r * KV + k) * T + slot) * hd, hd);
        std::copy(row + (H + KV + k) * hd, row + (H + KV + k + 1) * hd, vc + ((r * KV + k) * T + slot) * hd);
      }
      const float* prompt_k = pk + (group * KV + k) * P * hd;
      const float* prompt_v = pv + (group * KV + k) * P * hd;
      const float* bias = pb + group * P;
      for (int64_t j = 0; j < P; ++j) {  // each prompt key read once for every (row, head) of the task
        for (int64_t q_i = 0; q_i < heads; ++q_i)
          scores[q_i * L + j] = std::isinf(bias[j]) ? bias[j]
                                                    : dot(qr.data() + q_i * hd, prompt_k + j * hd, hd) * fscale + bias[j];
      }
      for (int64_t i = 0; i < m; ++i) {  // each generated key read once for its row's heads
        const float* key_slots = kc + (mine[i] * KV + k) * T * hd;
        for (int64_t j = 0; j <= slot; ++j)
          for (int64_t h = 0; h < g; ++h)
            scores[(i * g + h) * L + P + j] = dot(qr.data() + (i * g + h) * hd, key_slots + j * hd, hd) * fscale;
      }
      for (int64_t q_i = 0; q_i < heads; ++q_i) norm[q_i] = exp_shifted(scores.data() + q_i * L, L);
      // outputs, accumulated in place: row i's head h at op[(r·H + k·g + h)·hd]
      for (int64_t i = 0; i < m; ++i) std::fill(op + (mine[i] * H + k * g) * hd, op + (mine[i] * H + k * g + g) * hd, 0.f);
      for (int64_t j = 0; j < P; ++j) {  // each prompt value read once
        for (int64_t i = 0; i < m; ++i)
          for (int64_t h = 0; h < g; ++h) {
            const float p = scores[(i * g + h) * L + j];
            if (p != 0.f) axpy(op + (mine[i] * H + k * g + h) * hd, p, prompt_v + j * hd, hd);
          }
      }
      for (int64_t i = 0; i < m; ++i) {
        const float* value_slots = vc + (mine[i] * KV + k) * T * hd;
        float* o = op + (mine[i] * H + k * g) * hd;
        for (int64_t j = 0; j <= slot; ++j)
          for (int64_t h = 0; h < g; ++h) axpy(o + h * hd, scores[(i * g + h) * L + P + j], value_slots + j * hd, hd);
        for (int64_t h = 0; h < g; ++h) {
          const float inv = 1.f / norm[i * g + h];
          for (int64_t e = 0; e < hd; ++e) o[h * hd + e] *= inv;
        }
      }
    }
  });
  return out;
}

// keyed_sample — the inverse-CDF draw of rollout/sampling.py `inverse_cdf_sample` (top_p = 1) on z = x / T, and the
// policy's normalizer logsumexp(z) over every token. The tokens allowed are those not `banned` (for every row) and,
// by the row's `eos_rule`, eos too (0), not eos (1), or eos alone (2: drawn whatever u). Per row: the allowed
// tokens' weights e^(z − m) (m their max) summed per block of `block` tokens in one pass, the normalizer from
// those sums and the banned tokens' terms (logsumexp = m* + log(e^(m − m*)·S + Σ_banned e^(z − m*)), m* the max of
// every token), then the block that holds the quantile u·S and the token inside it — the torch function's
// arithmetic (fp32 weights and block sums, float64 cumulative sums, the same clamps), so both draw the same token
// but where an fp32 sum rounds differently by an ulp at a quantile's edge.
// Returns (tokens [rows] int64, logsumexp(z) [rows] float32).
namespace {

// e^(z[i] − m) for i in [lo, hi) into out[0, hi − lo): vector lanes from lo, scalar for the remainder — the one
// formula both the block sums and the search inside a block use, so they see the same weights
inline float block_weights(const float* z, int64_t lo, int64_t hi, float m, float* out) {
  using Vf = vec::Vectorized<float>;
  constexpr int64_t W = Vf::size();
  const Vf shift(m);
  Vf acc(0.f);
  int64_t i = lo;
  for (; i + W <= hi; i += W) {
    const Vf e = (Vf::loadu(z + i) - shift).exp();
    e.store(out + (i - lo));
    acc = acc + e;
  }
  float sum = vec::vec_reduce_all<float>([](const Vf& a, const Vf& b) { return a + b; }, acc);
  for (; i < hi; ++i) {
    out[i - lo] = std::exp(z[i] - m);
    sum += out[i - lo];
  }
  return sum;
}

inline float max_of(const float* z, int64_t n) {
  using Vf = vec::Vectorized<float>;
  constexpr int64_t W = Vf::size();
  Vf vm(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + W <= n; i += W) vm = vec::maximum(vm, Vf::loadu(z + i));
  float m = vec::vec_reduce_all<float>([](const Vf& a, const Vf& b) { return vec::maximum(a, b); }, vm);
  for (; i < n; ++i) m = std::max(m, z[i]);
  return m;
}

}  // namespace

std::tuple<Tensor, Tensor> keyed_sample(const Tensor& logits, const Tensor& u, double temperature, int64_t block,
                                        const Tensor& banned, int64_t eos, const Tensor& eos_rule) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.is_contiguous() && logits.dim() == 2 &&
              logits.device().is_cpu(), "keyed_sample: contiguous float32 [rows, V] CPU logits");
  TORCH_CHECK(u.scalar_type() == at::kDouble && banned.scalar_type() == at::kLong &&
              eos_rule.scalar_type() == at::kChar && u.numel() == logits.size(0) &&
              eos_rule.numel() == logits.size(0), "keyed_sample: u float64 [rows], banned int64, eos_rule int8 [rows]");
  const int64_t rows = logits.size(0), V = logits.size(1), blocks = (V + block - 1) / block;
  const float t = static_cast<float>(temperature);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  Tensor tokens = at::empty({rows}, logits.options().dtype(at::kLong));
  Tensor lse = at::empty({rows}, logits.options());
  const float* x = logits.data_ptr<float>();
  const double* up = u.data_ptr<double>();
  const int64_t* ban = banned.data_ptr<int64_t>();
  const int64_t n_ban = banned.numel();
  const int8_t* rule = eos_rule.data_ptr<int8_t>();
  int64_t* tp = tokens.data_ptr<int64_t>();
  float* lp = lse.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> z(V), weights(block);
    std::vector<double> cdf(blocks), inside(block);
    std::vector<float> banned_values;
    for (int64_t r = begin; r < end; ++r) {
      float* zr = z.data();
      const float* xr = x + r * V;
      for (int64_t i = 0; i < V; ++i) zr[i] = t == 1.f ? xr[i] : xr[i] / t;  // as torch's x / T
      if (rule[r] == 2) {  // eos alone: the normalizer over every token, the token without a draw
        const float m_all = max_of(zr, V);
        double all = 0.0;
        for (int64_t lo = 0; lo < V; lo += block)
          all += block_weights(zr, lo, std::min(V, lo + block), m_all, weights.data());
        lp[r] = m_all + static_cast<float>(std::log(all));
        tp[r] = eos;
        continue;
      }
      banned_values.clear();
      auto ban_token = [&](int64_t id) {
        if (zr[id] != neg_inf) banned_values.push_back(zr[id]);
        zr[id] = neg_inf;
      };
      for (int64_t b = 0; b < n_ban; ++b) ban_token(ban[b]);
      if (rule[r] == 1) ban_token(eos);
      const float m = max_of(zr, V);
      float m_all = m;
      for (float v : banned_values) m_all = std::max(m_all, v);
      double running = 0.0;
      for (int64_t blk = 0; blk < blocks; ++blk) {
        running += static_cast<double>(
            block_weights(zr, blk * block, std::min(V, (blk + 1) * block), m, weights.data()));
        cdf[blk] = running;
      }
      double all = std::exp(static_cast<double>(m) - m_all) * running;
      for (float v : banned_values) all += std::exp(static_cast<double>(v) - m_all);
      lp[r] = m_all + static_cast<float>(std::log(all));
      // the block holding the quantile: the first whose cumulative sum exceeds it (searchsorted, right)
      double target = up[r] * cdf[blocks - 1];
      const int64_t blk = std::min<int64_t>(std::upper_bound(cdf.begin(), cdf.end(), target) - cdf.begin(),
                                            blocks - 1);
      const double before = blk > 0 ? cdf[blk - 1] : 0.0;
      const int64_t lo = blk * block, hi = std::min(V, lo + block);
      block_weights(zr, lo, hi, m, weights.data());
      double acc = before;
      for (int64_t i = 0; i < block; ++i) {  // a short last block: its missing entries weigh 0
        if (lo + i < hi) acc += static_cast<double>(weights[i]);
        inside[i] = acc;
      }
      // strictly above the mass before the block, at most its end (the two sums round differently)
      target = std::min(std::max(target, std::nextafter(before, 2.0)), inside[block - 1]);
      const int64_t offset = std::lower_bound(inside.begin(), inside.end(), target) - inside.begin();
      tp[r] = std::min(lo + offset, V - 1);
    }
  });
  return {tokens, lse};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Decode-step ops of the native rollout (CPU): attention (rotary, cache write, prompt + generated "
            "slots) and keyed inverse-CDF sampling";
  m.def("decode_attention", &decode_attention, "one decode step's attention", py::arg("qkv"), py::arg("heads"),
        py::arg("cos"), py::arg("sin"), py::arg("prompt_keys"), py::arg("prompt_values"),
        py::arg("prompt_bias"), py::arg("row_group"), py::arg("keys"), py::arg("values"), py::arg("slot"),
        py::arg("scale"));
  m.def("keyed_sample", &keyed_sample, "inverse-CDF draw at quantiles u, and the normalizer", py::arg("logits"),
        py::arg("u"), py::arg("temperature"), py::arg("block"), py::arg("banned"), py::arg("eos"),
        py::arg("eos_rule"));
}
