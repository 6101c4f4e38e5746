// RMSNorm on CPU, forward and backward.
//
//   out = round(round(x * rstd) * weight),  rstd = 1 / sqrt(mean(x^2) + eps)   (one rstd per row)
//         (Meta: self._norm(x.float()).type_as(x) * self.weight; round() is to x's dtype, so it
//         only matters for bfloat16, and it rounds like the CUDA kernel)
//   grad_x      = rstd * (g*w) - x * rstd^3 * mean(g*w*x)
//   grad_weight = sum over rows of g * round(x * rstd)
//
// Shapes: x, out, grad_out, grad_x (..., C) seen as N = numel/C rows; weight, grad_weight (C);
// rstd (N) float32 for float32 and bfloat16 inputs and float64 for float64 ones (statistics never in
// less than float32; float64 keeps gradcheck exact). bfloat16 values are widened to float32 as they
// are loaded and rounded once when stored: T is the storage type, A the arithmetic type.
// Memory traffic: the forward reads x once and writes out once (the row is re-read from L1/L2);
// the backward reads g and x once and writes grad_x once. grad_weight is reduced in partial sums
// over a fixed number of row chunks (not one per thread), so no atomics, and the same bits
// whatever the thread count.
#include <torch/library.h>

#include "../common.h"

namespace llama2 {
namespace {

template <typename T, typename A>
void rms_norm_fwd_kernel(const T* x, const T* w, T* out, A* rstd, int64_t n_rows, int64_t C,
                         double eps) {
  at::parallel_for(0, n_rows, std::max<int64_t>(1, 16384 / C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * C;
      T* yr = out + r * C;
      // Mean of squares in the row; omp simd lets the compiler reorder the sum into vector lanes.
      A ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t c = 0; c < C; ++c) ss += widen(xr[c]) * widen(xr[c]);
      const A rs = A(1) / std::sqrt(ss / A(C) + A(eps));
      rstd[r] = rs;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        yr[c] = narrow<T>(widen(narrow<T>(widen(xr[c]) * rs)) * widen(w[c]));
      }
    }
  });
}

template <typename T, typename A>
void rms_norm_bwd_kernel(const T* g, const T* x, const T* w, const A* rstd, T* gx, T* gw,
                         int64_t n_rows, int64_t C) {
  // A fixed number of row chunks, one partial grad_weight each, shared out among the threads: the
  // chunking (and so the order of the sums) does not depend on the thread count.
  constexpr int64_t kChunks = 64;
  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(kChunks, n_rows));
  const int64_t rows_per_chunk = (n_rows + n_chunks - 1) / n_chunks;
  std::vector<A> partial(static_cast<size_t>(n_chunks * C), A(0));
  at::parallel_for(0, n_chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      A* pw = partial.data() + chunk * C;
      const int64_t r_end = std::min(n_rows, (chunk + 1) * rows_per_chunk);
      for (int64_t r = chunk * rows_per_chunk; r < r_end; ++r) {
        const T* gr = g + r * C;
        const T* xr = x + r * C;
        T* gxr = gx + r * C;
        const A rs = rstd[r];
        // dot = sum(g * w * x), the part of the gradient that flows through rstd.
        A dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < C; ++c) dot += widen(gr[c]) * widen(w[c]) * widen(xr[c]);
        const A k = rs * rs * rs * dot / A(C);
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          gxr[c] = narrow<T>(rs * widen(gr[c]) * widen(w[c]) - k * widen(xr[c]));
          pw[c] += widen(gr[c]) * widen(narrow<T>(widen(xr[c]) * rs));
        }
      }
    }
  });
  // Sum the partials in chunk order (in A; rounded to T once).
  for (int64_t c = 0; c < C; ++c) {
    A sum = 0;
    for (int64_t chunk = 0; chunk < n_chunks; ++chunk) sum += partial[chunk * C + c];
    gw[c] = narrow<T>(sum);
  }
}

void check_rms_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  check_cpu(x, op, "x");
  check_cpu(weight, op, "weight");
  check_float(x, op, "x");
  check_same_dtype(x, weight, op, "x", "weight");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension (..., C), got a scalar");
  TORCH_CHECK(weight.dim() == 1, op, ": weight must be 1-D (C,), got shape ", weight.sizes());
  TORCH_CHECK(weight.size(0) == x.size(-1), op, ": weight has ", weight.size(0),
              " elements but the last dimension of x is ", x.size(-1), "; they must match");
}

// x (..., C), weight (C) -> out (..., C), rstd (N)
std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                    double eps) {
  const char* op = "llama2::rms_norm_fwd";
  check_rms_inputs(op, x, weight);
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  const int64_t C = x.size(-1);
  const int64_t n_rows = C == 0 ? 0 : x.numel() / C;
  at::Tensor out = at::empty_like(xc);
  at::Tensor rstd = at::empty({n_rows}, xc.options().dtype(stat_dtype(xc.scalar_type())));
  if (n_rows == 0 || C == 0) return {out, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, xc.scalar_type(), "rms_norm_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    rms_norm_fwd_kernel<scalar_t, acc_t>(xc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
                                         out.data_ptr<scalar_t>(), rstd.data_ptr<acc_t>(), n_rows,
                                         C, eps);
  });
  return {out, rstd};
}

// grad_out (..., C), x (..., C), weight (C), rstd (N) -> grad_x (..., C), grad_weight (C)
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                    const at::Tensor& weight,
                                                    const at::Tensor& rstd) {
  const char* op = "llama2::rms_norm_bwd";
  check_rms_inputs(op, x, weight);
  check_cpu(grad_out, op, "grad_out");
  check_cpu(rstd, op, "rstd");
  check_same_dtype(x, grad_out, op, "x", "grad_out");
  TORCH_CHECK(rstd.scalar_type() == stat_dtype(x.scalar_type()), op, ": rstd has dtype ",
              rstd.scalar_type(), " but x is ", x.scalar_type(), ", so rstd must be ",
              stat_dtype(x.scalar_type()), "; pass the rstd returned by rms_norm_fwd for this x");
  TORCH_CHECK(grad_out.sizes() == x.sizes(), op, ": grad_out has shape ", grad_out.sizes(),
              " but x has shape ", x.sizes(), "; they must match");
  const int64_t C = x.size(-1);
  const int64_t n_rows = C == 0 ? 0 : x.numel() / C;
  TORCH_CHECK(rstd.numel() == n_rows, op, ": rstd has ", rstd.numel(), " elements but x has ",
              n_rows, " rows; pass the rstd returned by rms_norm_fwd for this x");
  const at::Tensor gc = grad_out.contiguous();
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  const at::Tensor rc = rstd.contiguous();
  at::Tensor gx = at::empty_like(xc);
  at::Tensor gw = at::zeros_like(wc);
  if (n_rows == 0 || C == 0) return {gx, gw};
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, xc.scalar_type(), "rms_norm_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    rms_norm_bwd_kernel<scalar_t, acc_t>(gc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(),
                                         wc.data_ptr<scalar_t>(), rc.data_ptr<acc_t>(),
                                         gx.data_ptr<scalar_t>(), gw.data_ptr<scalar_t>(), n_rows,
                                         C);
  });
  return {gx, gw};
}

}  // namespace
}  // namespace llama2

TORCH_LIBRARY_IMPL(llama2, CPU, m) {
  m.impl("rms_norm_fwd", &llama2::rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd", &llama2::rms_norm_bwd_cpu);
}
