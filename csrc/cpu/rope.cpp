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

#include "../common.h"

namespace llama2 {
namespace {

template <typename T, typename A>
void rope_kernel(const T* x, const int64_t* pos, const A* cos, const A* sin, T* out, int64_t B,
                 int64_t Tn, int64_t H, int64_t D, int64_t sb, int64_t st, int64_t sh,
                 bool inverse) {
  const int64_t half = D / 2;
  const A sign = inverse ? A(-1) : A(1);
  at::parallel_for(0, B * Tn, std::max<int64_t>(1, 4096 / (H * D)), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / Tn, t = row % Tn;
      // (D/2,) cos and sin of this token's position, shared by all H heads
      const A* c = cos + pos[row] * half;
      const A* s = sin + pos[row] * half;
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
  check_float(x, op, "x", /*bf16_ok=*/true);
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
  const at::Tensor pc = positions.contiguous();
  const int64_t* pp = pc.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * Tn; ++i) {
    TORCH_CHECK(pp[i] >= 0 && pp[i] < P, op, ": position ", pp[i], " (at flat index ", i,
                ") is outside the rope table of ", P,
                " positions; build a longer table (rope_table n_positions) or check positions");
  }
  // Tables in the arithmetic dtype (tiny: P x D/2), x with unit stride in its last dimension.
  const at::Tensor cc = cos.to(stat_dtype(x.scalar_type())).contiguous();
  const at::Tensor sc = sin.to(stat_dtype(x.scalar_type())).contiguous();
  const at::Tensor xc = x.stride(3) == 1 ? x : x.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rope_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    rope_kernel<scalar_t, acc_t>(xc.data_ptr<scalar_t>(), pp, cc.data_ptr<acc_t>(),
                                 sc.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), B, Tn, H, D,
                                 xc.stride(0), xc.stride(1), xc.stride(2), inverse);
  });
  return out;
}

}  // namespace
}  // namespace llama2

TORCH_LIBRARY_IMPL(llama2, CPU, m) {
  m.impl("rope", &llama2::rope_cpu);
}
