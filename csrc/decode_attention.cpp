// One decode step's attention for the native rollout on the CPU (papo_engine/rollout/decoder.py), fp32.
//
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Decode-step attention of the native rollout (CPU): rotary, cache write, prompt + generated slots";
  m.def("decode_attention", &decode_attention, "one decode step's attention", py::arg("qkv"), py::arg("heads"),
        py::arg("cos"), py::arg("sin"), py::arg("prompt_keys"), py::arg("prompt_values"),
        py::arg("prompt_bias"), py::arg("row_group"), py::arg("keys"), py::arg("values"), py::arg("slot"),
        py::arg("scale"));
}
