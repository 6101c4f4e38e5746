// Rotary position embedding (RoPE) on CPU, Meta's interleaved layout.
//
//   for each pair i < D/2 of a head vector:  (x[2i], x[2i+1]) rotated by angle = positions * freq_i
//   out[2i]   = x[2i] * cos - x[2i+1] * sin
//   out[2i+1] = x[2i] * sin + x[2i+1] * cos
//   inverse=True rotates by -angle (sin -> -sin); the rotation is orthogonal, so that is the backward.
//
// Shapes: x (B, T, H, D), D even, any strides with the last one 1; positions (B, T) int64;
// cos/sin (P, D/2) tables, rows indexed by position; out (B, T, H, D) contiguous.
// Memory traffic: x read once, out written once; the table row of a token is reused for all heads.
// x may be float32, float64 or bfloat16 (T); the tables and the arithmetic are float32 (float64 for
// float64 x) (A), and a bfloat16 result is rounded once, when stored.
#include <torch/library.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LLAMA2_ROPE_AVX2 1
#endif

#include "../common.h"

namespace llama2 {
namespace {

// positions (B, T) int64 read through its strides, so that (T,) positions expanded over the batch
// are not copied (nor any allocation made beside the output).
struct Positions {
  const int64_t* data;
  int64_t sb, st;
  int64_t operator()(int64_t b, int64_t t) const { return data[b * sb + t * st]; }
};

#ifdef LLAMA2_ROPE_AVX2
// The float32 step on x86 with AVX2 + FMA (what -march=native gives on this machine), for D a
// multiple of 8 and a 32-byte aligned output. Same arithmetic, 8 floats (4 pairs) per step, with
// the token's table row expanded once (for all its heads) to C = (c0, c0, c1, c1, ...) and
// S = (-s0, s0, -s1, s1, ...):
//   out = x * C + swap_pairs(x) * S,   swap_pairs(x0, x1, x2, x3, ...) = (x1, x0, x3, x2, ...)
// which gives out[2i] = x0 c - x1 s and out[2i+1] = x1 c + x0 s, as in the plain loop.
// RoPE is a pure stream (one read of x, one write of out) and the arithmetic is not what limits
// it: what does is the write. A plain store first reads each output cache line in (read for
// ownership) and leaves it in cache. When the output is much larger than the per-core L2 cache
// (kStreamBytes) it is written with streaming (non-temporal) stores instead, which skip that read:
// the op then runs at the speed of a tensor copy. The cost: the next op reads the output from
// memory rather than from L3, which for outputs this large it mostly would anyway.
constexpr int64_t kMaxAvx2D = 1024;
constexpr int64_t kStreamBytes = int64_t(4) << 20;

inline void rope_head_avx2(const float* xi, float* yo, const float* C, const float* S, int64_t D,
                           bool stream) {
  for (int64_t j = 0; j < D; j += 8) {
    const __m256 v = _mm256_loadu_ps(xi + j);
    const __m256 swapped = _mm256_permute_ps(v, 0b10110001);  // (1, 0, 3, 2) in each lane
    const __m256 r = _mm256_fmadd_ps(v, _mm256_load_ps(C + j),
                                     _mm256_mul_ps(swapped, _mm256_load_ps(S + j)));
    if (stream) {
      _mm256_stream_ps(yo + j, r);
    } else {
      _mm256_store_ps(yo + j, r);
    }
  }
}
#endif

// vec: take the AVX2 step (float32 only; rope_cpu decides); stream: with streaming stores.
template <typename T, typename A>
void rope_kernel(const T* x, Positions pos, const A* cos, const A* sin, T* out, int64_t B,
                 int64_t Tn, int64_t H, int64_t D, int64_t sb, int64_t st, int64_t sh,
                 bool inverse, bool vec, bool stream) {
  const int64_t half = D / 2;
  const A sign = inverse ? A(-1) : A(1);
  at::parallel_for(0, B * Tn, std::max<int64_t>(1, 4096 / (H * D)), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / Tn, t = row % Tn;
      // (D/2,) cos and sin of this token's position, shared by all H heads
      const A* c = cos + pos(b, t) * half;
      const A* s = sin + pos(b, t) * half;
#ifdef LLAMA2_ROPE_AVX2
      if constexpr (std::is_same_v<T, float>) {
        if (vec) {
          alignas(32) float C[kMaxAvx2D], S[kMaxAvx2D];
          for (int64_t i = 0; i < half; ++i) {
            C[2 * i] = C[2 * i + 1] = c[i];
            S[2 * i] = -sign * s[i];
            S[2 * i + 1] = sign * s[i];
          }
          for (int64_t h = 0; h < H; ++h) {
            rope_head_avx2(x + b * sb + t * st + h * sh, out + (row * H + h) * D, C, S, D, stream);
          }
          continue;
        }
      }
#endif
      for (int64_t h = 0; h < H; ++h) {
        const T* xi = x + b * sb + t * st + h * sh;
        T* yo = out + (row * H + h) * D;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const A x0 = widen(xi[2 * i]), x1 = widen(xi[2 * i + 1]);
          const A si = sign * s[i];
          yo[2 * i] = narrow<T>(x0 * c[i] - x1 * si);
          yo[2 * i + 1] = narrow<T>(x0 * si + x1 * c[i]);
        }
      }
    }
#ifdef LLAMA2_ROPE_AVX2
    if (stream) _mm_sfence();  // streaming stores are weakly ordered: finish them before returning
#endif
  });
}

// x (B, T, H, D), positions (B, T) int64, cos/sin (P, D/2) -> out (B, T, H, D)
at::Tensor rope_cpu(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos,
                    const at::Tensor& sin, bool inverse) {
  const char* op = "llama2::rope";
  check_cpu(x, op, "x");
  check_cpu(positions, op, "positions");
  check_cpu(cos, op, "cos");
  check_cpu(sin, op, "sin");
  check_float(x, op, "x");
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (B, T, H, D), got shape ", x.sizes());
  const int64_t B = x.size(0), Tn = x.size(1), H = x.size(2), D = x.size(3);
  TORCH_CHECK(D % 2 == 0, op, ": head_dim D must be even (pairs are rotated), got D=", D);
  TORCH_CHECK(positions.scalar_type() == at::kLong, op, ": positions must be int64, got ",
              positions.scalar_type());
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == B && positions.size(1) == Tn, op,
              ": positions must have shape (B, T) = (", B, ", ", Tn, "), got ", positions.sizes());
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) == D / 2, op,
              ": cos must have shape (P, D/2) with D/2 = ", D / 2, ", got ", cos.sizes());
  TORCH_CHECK(sin.sizes() == cos.sizes(), op, ": sin has shape ", sin.sizes(), " but cos has ",
              cos.sizes(), "; build both with the same rope_table call");
  TORCH_CHECK(cos.is_floating_point() && sin.is_floating_point(), op,
              ": cos/sin must be floating point tables, got ", cos.scalar_type());
  const int64_t P = cos.size(0);
  at::Tensor out = at::empty({B, Tn, H, D}, x.options());
  if (x.numel() == 0) return out;

  // Every position must index a row of the table; say which one does not.
  const Positions pp{positions.data_ptr<int64_t>(), positions.stride(0), positions.stride(1)};
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < Tn; ++t) {
      TORCH_CHECK(pp(b, t) >= 0 && pp(b, t) < P, op, ": position ", pp(b, t), " (batch ", b,
                  ", token ", t, ") is outside the rope table of ", P,
                  " positions; build a longer table (rope_table n_positions) or check positions");
    }
  }
  // Tables in the arithmetic dtype (tiny: P x D/2), x with unit stride in its last dimension.
  const at::Tensor cc = cos.to(stat_dtype(x.scalar_type())).contiguous();
  const at::Tensor sc = sin.to(stat_dtype(x.scalar_type())).contiguous();
  const at::Tensor xc = x.stride(3) == 1 ? x : x.contiguous();
  // The AVX2 step where it applies (float32), with streaming stores for large outputs.
  bool vec = false, stream = false;
#ifdef LLAMA2_ROPE_AVX2
  vec = x.scalar_type() == at::kFloat && D % 8 == 0 && D <= kMaxAvx2D &&
        reinterpret_cast<uintptr_t>(out.data_ptr()) % 32 == 0;
  stream = vec && out.nbytes() >= kStreamBytes;
#endif
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rope_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    rope_kernel<scalar_t, acc_t>(xc.data_ptr<scalar_t>(), pp, cc.data_ptr<acc_t>(),
                                 sc.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), B, Tn, H, D,
                                 xc.stride(0), xc.stride(1), xc.stride(2), inverse, vec, stream);
  });
  return out;
}

}  // namespace
}  // namespace llama2

TORCH_LIBRARY_IMPL(llama2, CPU, m) {
  m.impl("rope", &llama2::rope_cpu);
}
