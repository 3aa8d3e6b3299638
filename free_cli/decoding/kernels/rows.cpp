// free's CPU kernel for passes of few rows: y = x W^T (+ b), W bf16 or fp32, x and y in W's dtype.
//
// A decoding step multiplies one row, a verification pass a few, by every weight matrix. PyTorch's
// CPU kernels read the weights once per row or worse for such shapes where bf16 is not native
// (AVX2 only): a bf16 pass costs about 12 ms more per row on SmolLM2-135M. Here every weight is
// read once per pass, converted to fp32 in registers and multiplied into up to eight rows at a
// time, so a pass of k rows costs little more than one while memory is the bound.
//
// Every output y[i][n] is one fixed sequence of operations: eight fp32 lanes of fused
// multiply-adds over K in order, summed across lanes in a fixed order, plus the tail and the
// bias, rounded once to the output dtype. It depends on row i of x and row n of W alone, never on
// how many rows the pass has or how they are tiled: a row computes to the same bits alone or in
// any pass (the lossless mode's verification then reproduces single steps exactly here).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

inline __m256 load8(const c10::BFloat16* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline float as_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float as_float(float v) { return v; }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// MR rows of x (fp32, stride K) against NR rows of w: out[i * ldo + j] = dot(x_i, w_j) + bias_j.
template <int MR, int NR, typename W>
inline void tile(const float* x, const W* w, const W* bias, int64_t K, W* out, int64_t ldo) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t K8 = K & ~int64_t(7);
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = load8(w + j * K + k);
    for (int i = 0; i < MR; ++i) {
      __m256 xv = _mm256_loadu_ps(x + i * K + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float s = hsum(acc[i][j]);
      for (int64_t k = K8; k < K; ++k) s += x[i * K + k] * as_float(w[j * K + k]);
      if (bias) s += as_float(bias[j]);
      out[i * ldo + j] = static_cast<W>(s);
    }
}

// Rows MR at a time against features [n0, n1), NR at a time: MR * NR accumulators in registers.
template <int MR, typename W>
inline void rows_block(const float* x, const W* w, const W* bias, int64_t K, W* out, int64_t N, int64_t n0, int64_t n1) {
  constexpr int NR = MR == 1 ? 8 : MR == 2 ? 4 : MR == 3 ? 3 : MR <= 6 ? 2 : 1;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) tile<MR, NR>(x, w + n * K, bias ? bias + n : nullptr, K, out + n, N);
  for (; n < n1; ++n) tile<MR, 1>(x, w + n * K, bias ? bias + n : nullptr, K, out + n, N);
}

// Threads split the output features; within a thread a block of 32 features stays in L1 while
// every group of eight rows passes over it.
template <typename W>
void run(const float* x, const W* w, const W* bias, int64_t M, int64_t K, int64_t N, W* out) {
  at::parallel_for(0, N, 64, [&](int64_t a, int64_t b) {
    for (int64_t n0 = a; n0 < b; n0 += 32) {
      const int64_t n1 = std::min(b, n0 + 32);
      int64_t i = 0;
      for (; i + 8 <= M; i += 8) rows_block<8>(x + i * K, w, bias, K, out + i * N, N, n0, n1);
      const float* xi = x + i * K;
      W* oi = out + i * N;
      switch (M - i) {
        case 7: rows_block<7>(xi, w, bias, K, oi, N, n0, n1); break;
        case 6: rows_block<6>(xi, w, bias, K, oi, N, n0, n1); break;
        case 5: rows_block<5>(xi, w, bias, K, oi, N, n0, n1); break;
        case 4: rows_block<4>(xi, w, bias, K, oi, N, n0, n1); break;
        case 3: rows_block<3>(xi, w, bias, K, oi, N, n0, n1); break;
        case 2: rows_block<2>(xi, w, bias, K, oi, N, n0, n1); break;
        case 1: rows_block<1>(xi, w, bias, K, oi, N, n0, n1); break;
      }
    }
  });
}


// ---------------------------------------------------------------------------------------------
// Attention over a cache for a few query rows, each row alone: scores q.k_j (eight fp32 lanes over
// the head dimension, summed across lanes in a fixed order), a softmax in fp32 with a fixed order
// of sums, and sum_j p_j v_j over keys in order. A query's output depends on its own row, the keys
// and values and its mask row only: the same bits in a step of one row or a pass of many.

// exp(x) for x <= 0 (scores minus their maximum): Cephes' polynomial as in avx_mathfun, about
// 1 ulp; -inf gives 0.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 masked = _mm256_cmp_ps(x, _mm256_set1_ps(-88.0f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-88.0f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, z, x), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(0x7f)), 23);
  return _mm256_andnot_ps(masked, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

template <typename T>
inline float dot(const float* q, const T* k, int64_t d) {
  __m256 acc = _mm256_setzero_ps();
  const int64_t d8 = d & ~int64_t(7);
  for (int64_t c = 0; c < d8; c += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), load8(k + c), acc);
  float s = hsum(acc);
  for (int64_t c = d8; c < d; ++c) s += q[c] * as_float(k[c]);
  return s;
}

// One query row: q (d, fp32), keys and values (rows of stride `ks`, `vs`), visible[j] or all n;
// out (d) in T's dtype. `p` is scratch for n floats. Keys after the last visible one are left
// out, so a row sees the same n, and sums in the same order, whatever the pass's widest row.
template <typename T>
void attend_row(const float* q, const T* k, int64_t ks, const T* v, int64_t vs, const bool* visible, int64_t n, int64_t d,
                float scale, float* p, float* acc, T* out) {
  if (visible != nullptr)
    while (n > 0 && !visible[n - 1]) --n;
  float top = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    p[j] = (visible == nullptr || visible[j]) ? dot(q, k + j * ks, d) * scale : -INFINITY;
    top = std::max(top, p[j]);
  }
  const __m256 m = _mm256_set1_ps(top);
  __m256 sum8 = _mm256_setzero_ps();
  const int64_t n8 = n & ~int64_t(7);
  for (int64_t j = 0; j < n8; j += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(p + j), m));
    _mm256_storeu_ps(p + j, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  float sum = hsum(sum8);
  for (int64_t j = n8; j < n; ++j) {
    float tail[8] = {p[j] - top, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    p[j] = _mm256_cvtss_f32(exp_nonpositive(_mm256_loadu_ps(tail)));
    sum += p[j];
  }
  const int64_t d8 = d & ~int64_t(7);
  std::fill(acc, acc + d, 0.0f);
  for (int64_t j = 0; j < n; ++j) {
    if (p[j] == 0.0f) continue;
    const __m256 w = _mm256_set1_ps(p[j]);
    const T* vj = v + j * vs;
    for (int64_t c = 0; c < d8; c += 8) _mm256_storeu_ps(acc + c, _mm256_fmadd_ps(w, load8(vj + c), _mm256_loadu_ps(acc + c)));
    for (int64_t c = d8; c < d; ++c) acc[c] += p[j] * as_float(vj[c]);
  }
  const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
  for (int64_t c = 0; c < d; ++c) out[c] = static_cast<T>(acc[c] * inv);
}

template <typename T>
void attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& mask, float scale, torch::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), D = q.size(3), HK = k.size(1), N = k.size(2);
  const int64_t group = H / HK;
  auto qf = q.to(torch::kFloat).contiguous();  // (B, H, M, D)
  const float* qp = qf.data_ptr<float>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();  // (B, M, H, D)
  const bool* mp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  const int64_t mb = mask.defined() && mask.size(0) > 1 ? mask.stride(0) : 0, mh = mask.defined() && mask.size(1) > 1 ? mask.stride(1) : 0;
  const int64_t mm = mask.defined() ? mask.stride(2) : 0;
  at::parallel_for(0, B * H * M, 1, [&](int64_t a, int64_t b) {
    std::vector<float> scratch(N + D);
    for (int64_t r = a; r < b; ++r) {
      const int64_t bi = r / (H * M), h = (r / M) % H, i = r % M, hk = h / group;
      attend_row(qp + ((bi * H + h) * M + i) * D, kp + bi * k.stride(0) + hk * k.stride(1), k.stride(2),
                 vp + bi * v.stride(0) + hk * v.stride(1), v.stride(2),
                 mp ? mp + bi * mb + h * mh + i * mm : nullptr, N, D, scale, scratch.data(), scratch.data() + N,
                 op + ((bi * M + i) * H + h) * D);
    }
  });
}

}  // namespace

torch::Tensor linear_rows(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && x.scalar_type() == w.scalar_type(), "linear_rows: contiguous weight of x's dtype");
  const int64_t K = w.size(1), N = w.size(0);
  TORCH_CHECK(x.size(-1) == K, "linear_rows: x has ", x.size(-1), " features, the weight ", K);
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto xf = x.reshape({-1, K}).to(torch::kFloat).contiguous();
  const int64_t M = xf.size(0);
  auto out = torch::empty(sizes, x.options());
  const torch::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : torch::Tensor();
  if (w.scalar_type() == torch::kBFloat16) {
    run(xf.data_ptr<float>(), w.data_ptr<c10::BFloat16>(), b.defined() ? b.data_ptr<c10::BFloat16>() : nullptr, M, K, N, out.data_ptr<c10::BFloat16>());
  } else {
    TORCH_CHECK(w.scalar_type() == torch::kFloat, "linear_rows: weights must be bf16 or fp32");
    run(xf.data_ptr<float>(), w.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr, M, K, N, out.data_ptr<float>());
  }
  return out;
}

// q (B, H, M, D), k and v (B, HK, N, D) with unit stride in D (a cache's views), mask (B or 1,
// 1 or H, M, N) bool with unit stride in N, or none; H a multiple of HK (grouped queries). Returns
// (B, M, H, D), as transformers' attention functions do.
torch::Tensor attention_rows(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const c10::optional<torch::Tensor>& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(1) % k.size(1) == 0, "attention_rows: (B, H, M, D) queries, (B, HK, N, D) keys");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() && k.stride(3) == 1 && v.stride(3) == 1, "attention_rows: keys and values of the queries' dtype, unit stride in D");
  torch::Tensor m = mask.has_value() && mask->defined() ? *mask : torch::Tensor();
  TORCH_CHECK(!m.defined() || (m.scalar_type() == torch::kBool && m.dim() == 4 && m.stride(3) == 1 && m.size(3) == k.size(2)), "attention_rows: a bool mask (B, H, M, N) with unit stride in N");
  auto out = torch::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options());
  if (q.scalar_type() == torch::kBFloat16)
    attend<c10::BFloat16>(q, k, v, m, static_cast<float>(scale), out);
  else {
    TORCH_CHECK(q.scalar_type() == torch::kFloat, "attention_rows: bf16 or fp32");
    attend<float>(q, k, v, m, static_cast<float>(scale), out);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_rows", &linear_rows);
  m.def("attention_rows", &attention_rows);
}
