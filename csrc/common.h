// Shared helpers for the CPU kernels: input checks that speak in words, a dynamic work queue over
// at::parallel_for, a vectorizable exp, and row-major GEMM on top of the BLAS that torch links.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LLAMA2_AVX2 1
#endif

// Fortran BLAS (MKL or OpenBLAS underneath), column-major, 32-bit ints. Most libtorch_cpu builds
// export these symbols; they are declared weak so that the extension still loads where one does
// not (at::native::cpublas::gemm is not exported either), and gemm_rm then calls at::addmm_.
extern "C" {
__attribute__((weak)) void sgemm_(const char* transa, const char* transb, const int* m,
                                  const int* n, const int* k, const float* alpha, const float* a,
                                  const int* lda, const float* b, const int* ldb,
                                  const float* beta, float* c, const int* ldc);
__attribute__((weak)) void dgemm_(const char* transa, const char* transb, const int* m,
                                  const int* n, const int* k, const double* alpha,
                                  const double* a, const int* lda, const double* b,
                                  const int* ldb, const double* beta, double* c, const int* ldc);
}

namespace llama2 {

// ---------------------------------------------------------------------------------------------
// Input checks
// ---------------------------------------------------------------------------------------------

inline void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is on ", t.device(),
              " but this is the CPU kernel; move all inputs to the same device");
}

// float32, float64 or bfloat16 (bfloat16 is computed in float32 and rounded once, when stored).
inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16, op, ": ", name,
              " has dtype ", st, "; this CPU kernel takes float32, float64 or bfloat16",
              " (cast with .float() or use the reference path)");
}

// The dtype of statistics (rstd, lse) and of in-kernel arithmetic: float64 for float64, else float32.
inline at::ScalarType stat_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* op,
                             const char* name_a, const char* name_b) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", name_a, " is ", a.scalar_type(),
              " but ", name_b, " is ", b.scalar_type(), "; they must have the same dtype");
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const char* name_a, const char* name_b) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", name_a, " is on ", a.device(), " but ", name_b,
              " is on ", b.device(), "; move all inputs to the same device");
}

// ---------------------------------------------------------------------------------------------
// Widening loads and rounding stores: float32/float64 pass through; bfloat16 is the top half of a
// float32, so widening is a shift and storing rounds to nearest even (NaN stays NaN), the same
// result as c10::BFloat16's conversions. Written on the raw bits with no branches, so loops over
// them vectorize (c10's own conversions do not, inside these kernels).
// ---------------------------------------------------------------------------------------------

template <typename T>
inline auto widen(T v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint32_t u = uint32_t(v.x) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  } else {
    return v;
  }
}

template <typename T, typename A>
inline T narrow(A v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return c10::BFloat16(static_cast<uint16_t>(v != v ? 0x7fc0u : rounded), c10::BFloat16::from_bits());
  } else {
    return T(v);
  }
}

// ---------------------------------------------------------------------------------------------
// Work distribution
// ---------------------------------------------------------------------------------------------

// Runs fn(item) for item in [0, n) on all intra-op threads, each thread pulling the next item from a
// shared counter. Causal attention tiles have very different costs, so a static split would leave a
// thread idle; list the expensive items first for the best balance. total_flops below ~1e6 runs on
// the calling thread: waking the others would cost more than the work.
template <typename F>
void parallel_items(int64_t n, double total_flops, const F& fn) {
  if (n <= 0) return;
  const int64_t n_threads = std::min<int64_t>(at::get_num_threads(), n);
  if (n_threads <= 1 || total_flops < 1e6 || at::in_parallel_region()) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, n_threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// exp that the compiler can vectorize
// ---------------------------------------------------------------------------------------------

// exp(x) for float: 2^n * p(r) with x = n*ln2 + r, |r| <= ln2/2, p a degree-6 polynomial
// (relative error ~2e-7, close to float rounding). Plain arithmetic and a bit cast, no libm call,
// so loops over it turn into AVX2/AVX-512 code. x <= -88 gives exactly 0 (masked scores are -inf).
inline float fast_exp(float x) {
  x = std::max(x, -88.0f);
  x = std::min(x, 88.0f);
  // Round to nearest by adding and removing 1.5 * 2^23 (exact in float; vectorizes everywhere).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  // Cody-Waite: ln2 split in a high part exact in float and a small correction.
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float y = p * scale;
  return x <= -88.0f ? 0.0f : y;
}

// float64 keeps libm's exp: gradcheck needs it exact to the last bits.
template <typename T>
inline T exp_of(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return fast_exp(x);
  } else {
    return std::exp(x);
  }
}

#ifdef LLAMA2_AVX2
// fast_exp on 8 floats at once, the same steps written with AVX2/FMA intrinsics.
inline __m256 fast_exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-88.0f), _CMP_LE_OQ);
  return _mm256_andnot_ps(underflow, y);
}
#endif

// Softmax row helpers. max over s[0, n):
template <typename T>
inline T row_max(const T* s, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
  int64_t c = 0;
#ifdef LLAMA2_AVX2
  if constexpr (std::is_same_v<T, float>) {
    __m256 vm = _mm256_set1_ps(m);
    for (; c + 8 <= n; c += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(s + c));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vm);
    for (float l : lanes) m = std::max(m, l);
  }
#endif
  for (; c < n; ++c) m = std::max(m, s[c]);
  return m;
}

// s[c] = exp(s[c] - shift) for c in [0, n); returns the sum of the new values.
template <typename T>
inline T exp_shift_sum(T* s, int64_t n, T shift) {
  T sum = 0;
  int64_t c = 0;
#ifdef LLAMA2_AVX2
  if constexpr (std::is_same_v<T, float>) {
    const __m256 vs = _mm256_set1_ps(shift);
    __m256 acc = _mm256_setzero_ps();
    for (; c + 8 <= n; c += 8) {
      const __m256 p = fast_exp8(_mm256_sub_ps(_mm256_loadu_ps(s + c), vs));
      _mm256_storeu_ps(s + c, p);
      acc = _mm256_add_ps(acc, p);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, acc);
    for (float l : lanes) sum += l;
  }
#endif
  for (; c < n; ++c) {
    s[c] = exp_of<T>(s[c] - shift);
    sum += s[c];
  }
  return sum;
}

// ---------------------------------------------------------------------------------------------
// Row-major GEMM: C (m x n) = alpha * op(A) @ op(B) + beta * C
// ---------------------------------------------------------------------------------------------

// Whether gemm_rm calls the Fortran BLAS: the symbols resolved, and LLAMA2_CPU_GEMM=aten not set
// (that forces the ATen path, for the tests). Decided once.
inline bool use_fortran_blas() {
  static const bool use = [] {
    const char* env = std::getenv("LLAMA2_CPU_GEMM");
    const bool forced_aten = env != nullptr && std::strcmp(env, "aten") == 0;
    return !forced_aten && sgemm_ != nullptr && dgemm_ != nullptr;
  }();
  return use;
}

// A row-major matrix is the column-major transpose, so C^T = op(B)^T op(A)^T is one BLAS call with
// the operands swapped. trans_a: A is stored (k x m) and used transposed; same for trans_b (n x k).
// lda/ldb/ldc are row strides in elements.
template <typename T>
inline void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha,
                    const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (!use_fortran_blas()) {
    // Views of the three buffers and one in-place addmm_ (beta == 0 ignores what C held).
    const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
    auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
      const at::Tensor t = at::from_blob(const_cast<T*>(p), {trans ? cols : rows, trans ? rows : cols},
                                         {ld, 1}, opts);
      return trans ? t.t() : t;
    };
    at::Tensor cv = at::from_blob(c, {m, n}, {ldc, 1}, opts);
    cv.addmm_(view(a, m, k, lda, trans_a), view(b, k, n, ldb, trans_b), beta, alpha);
    return;
  }
  const char ta = trans_b ? 'T' : 'N';
  const char tb = trans_a ? 'T' : 'N';
  const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, b, &la, a, &lb, &beta, c, &lc);
  } else {
    dgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, b, &la, a, &lb, &beta, c, &lc);
  }
}

}  // namespace llama2
