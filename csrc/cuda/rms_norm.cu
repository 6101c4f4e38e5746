// RMSNorm on the GPU, forward and backward (Meta's Llama RMSNorm).
//
// Formula, per row x of C features, r = rstd = 1 / sqrt(mean(x^2) + eps):
//   forward   out = round(round(x * r) * w)     (Meta: self._norm(x.float()).type_as(x) * weight)
//   backward  with gw = g * w:  dx = r * gw - x * r^3 * mean(gw * x)
//             dw = sum over rows of g * round(x * r)
// Shapes: x, out, grad_out, grad_x (..., C) seen as N rows; weight, grad_weight (C); rstd (N)
// float32. float32, float16 and bfloat16 in, float32 arithmetic, one rounding on store.
//
// Memory traffic aimed at: forward reads x from DRAM once (its second pass hits L1/L2 in the same
// block) and writes out once: 2*N*C elements, plus the weight from L2. Backward reads g and x and
// writes dx (3*N*C elements); grad_weight is summed per block in shared memory (each thread owns
// fixed columns, so no atomics) into a float32 (blocks, C) buffer, then one small kernel sums the
// buffer's columns in a fixed order (deterministic) and casts.
// One block per row (grid-stride over rows), 16-byte vector loads when C and the pointers allow.
#include <torch/library.h>

#include "common.cuh"
#include "rms_norm_kernels.cuh"

namespace llama2 {
namespace cuda {
namespace {

// Checks shared by forward and backward; returns C.
int64_t check_rms_inputs(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  check_cuda(x, op, "x");
  check_same_device(x, weight, op, "x", "weight");
  check_same_dtype(x, weight, op, "x", "weight");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dim (..., C), got a scalar");
  check_dim(weight, 1, op, "weight", "(C)");
  const int64_t C = x.size(-1);
  TORCH_CHECK(weight.size(0) == C, op, ": weight has ", weight.size(0),
              " elements but x's last dim is ", C, "; they must match");
  TORCH_CHECK(C > 0 && C < (int64_t(1) << 31), op, ": the last dim of x must be in [1, 2^31), got ",
              C);
  return C;
}

// At most this many blocks per SM (grid-stride over the rows beyond): the forward's blocks are
// short-lived; each backward block also writes a row of dw partial sums, so fewer.
constexpr int kFwdBlocksPerSm = 16;
constexpr int kBwdBlocksPerSm = 4;

// x (..., C), weight (C) -> out (..., C), rstd (N) float32
std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cuda(const at::Tensor& x_in,
                                                     const at::Tensor& weight_in, double eps) {
  const char* op = "llama2::rms_norm_fwd";
  const int64_t C = check_rms_inputs(x_in, weight_in, op);
  TORCH_CHECK(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
  const c10::cuda::OptionalCUDAGuard guard(device_of(x_in));
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const int64_t N = x.numel() / C;
  at::Tensor out = at::empty_like(x);
  at::Tensor rstd = at::empty({N}, x.options().dtype(at::kFloat));
  if (N == 0) return {out, rstd};
  LLAMA2_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), op, [&] {
    rms_norm_fwd_launch(reinterpret_cast<const scalar_t*>(x.data_ptr()),
                        reinterpret_cast<const scalar_t*>(weight.data_ptr()),
                        reinterpret_cast<scalar_t*>(out.data_ptr()), rstd.data_ptr<float>(), N,
                        static_cast<int>(C), static_cast<float>(eps),
                        static_cast<int64_t>(sm_count()) * kFwdBlocksPerSm, stream_launcher(op));
  });
  return {out, rstd};
}

// grad_out, x (..., C), weight (C), rstd (N) float32 -> grad_x (..., C), grad_weight (C)
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cuda(const at::Tensor& grad_out_in,
                                                     const at::Tensor& x_in,
                                                     const at::Tensor& weight_in,
                                                     const at::Tensor& rstd_in) {
  const char* op = "llama2::rms_norm_bwd";
  const int64_t C = check_rms_inputs(x_in, weight_in, op);
  check_same_device(x_in, grad_out_in, op, "x", "grad_out");
  check_same_device(x_in, rstd_in, op, "x", "rstd");
  check_same_dtype(x_in, grad_out_in, op, "x", "grad_out");
  TORCH_CHECK(grad_out_in.sizes() == x_in.sizes(), op, ": grad_out has shape ", grad_out_in.sizes(),
              " but x has shape ", x_in.sizes(), "; they must match");
  TORCH_CHECK(rstd_in.scalar_type() == at::kFloat, op,
              ": rstd must be float32 (as rms_norm_fwd returns it), got ", rstd_in.scalar_type());
  const int64_t N = x_in.numel() / C;
  TORCH_CHECK(rstd_in.numel() == N, op, ": rstd has ", rstd_in.numel(), " elements but x has ", N,
              " rows of ", C, "; pass the rstd that rms_norm_fwd returned for this x");
  const c10::cuda::OptionalCUDAGuard guard(device_of(x_in));
  const at::Tensor x = x_in.contiguous(), g = grad_out_in.contiguous();
  const at::Tensor weight = weight_in.contiguous(), rstd = rstd_in.contiguous();
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_weight = at::empty_like(weight);
  if (N == 0) return {grad_x, grad_weight.zero_()};
  const int64_t max_blocks = static_cast<int64_t>(sm_count()) * kBwdBlocksPerSm;
  at::Tensor partial =
      at::empty({rms_norm_bwd_blocks(N, max_blocks), C}, x.options().dtype(at::kFloat));
  LLAMA2_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), op, [&] {
    rms_norm_bwd_launch(reinterpret_cast<const scalar_t*>(g.data_ptr()),
                        reinterpret_cast<const scalar_t*>(x.data_ptr()),
                        reinterpret_cast<const scalar_t*>(weight.data_ptr()),
                        rstd.data_ptr<float>(), reinterpret_cast<scalar_t*>(grad_x.data_ptr()),
                        reinterpret_cast<scalar_t*>(grad_weight.data_ptr()),
                        partial.data_ptr<float>(), N, static_cast<int>(C), max_blocks,
                        stream_launcher(op));
  });
  return {grad_x, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(llama2, CUDA, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd_cuda);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cuda);
}

}  // namespace cuda
}  // namespace llama2
