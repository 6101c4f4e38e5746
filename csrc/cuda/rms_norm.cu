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

// 16-byte vectors when every row starts on a 16-byte boundary.
template <typename T>
bool use_vec(int64_t C, std::initializer_list<const void*> ptrs) {
  if (C % vec16<T>() != 0) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

int rows_grid(int64_t N, int mult) {
  const int sms = sm_count();
  return static_cast<int>(std::min<int64_t>(N, static_cast<int64_t>(sms) * mult));
}

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
  auto stream = current_stream();
  LLAMA2_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), op, [&] {
    const auto* xp = reinterpret_cast<const scalar_t*>(x.data_ptr());
    const auto* wp = reinterpret_cast<const scalar_t*>(weight.data_ptr());
    auto* op_ = reinterpret_cast<scalar_t*>(out.data_ptr());
    const int grid = rows_grid(N, 16);
    if (use_vec<scalar_t>(C, {xp, wp, op_})) {
      constexpr int VEC = vec16<scalar_t>();
      rms_norm_fwd_kernel<scalar_t, VEC><<<grid, row_threads(C, VEC), 0, stream>>>(
          xp, wp, op_, rstd.data_ptr<float>(), N, static_cast<int>(C), static_cast<float>(eps));
    } else {
      rms_norm_fwd_kernel<scalar_t, 1><<<grid, row_threads(C, 1), 0, stream>>>(
          xp, wp, op_, rstd.data_ptr<float>(), N, static_cast<int>(C), static_cast<float>(eps));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  const int grid = rows_grid(N, 4);
  at::Tensor partial = at::empty({grid, C}, x.options().dtype(at::kFloat));
  const size_t shmem = static_cast<size_t>(C) * sizeof(float);
  auto stream = current_stream();
  LLAMA2_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), op, [&] {
    const auto* gp = reinterpret_cast<const scalar_t*>(g.data_ptr());
    const auto* xp = reinterpret_cast<const scalar_t*>(x.data_ptr());
    const auto* wp = reinterpret_cast<const scalar_t*>(weight.data_ptr());
    auto* dxp = reinterpret_cast<scalar_t*>(grad_x.data_ptr());
    if (use_vec<scalar_t>(C, {gp, xp, wp, dxp})) {
      constexpr int VEC = vec16<scalar_t>();
      auto kernel = rms_norm_bwd_kernel<scalar_t, VEC>;
      set_shared_memory(kernel, shmem, op, 32 * sizeof(float));  // + shm[32]
      kernel<<<grid, row_threads(C, VEC), shmem, stream>>>(gp, xp, wp, rstd.data_ptr<float>(), dxp,
                                                           partial.data_ptr<float>(), N,
                                                           static_cast<int>(C));
    } else {
      auto kernel = rms_norm_bwd_kernel<scalar_t, 1>;
      set_shared_memory(kernel, shmem, op, 32 * sizeof(float));  // + shm[32]
      kernel<<<grid, row_threads(C, 1), shmem, stream>>>(gp, xp, wp, rstd.data_ptr<float>(), dxp,
                                                         partial.data_ptr<float>(), N,
                                                         static_cast<int>(C));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int threads = 256;
    const int blocks = static_cast<int>((C + threads - 1) / threads);
    sum_columns_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        partial.data_ptr<float>(), reinterpret_cast<scalar_t*>(grad_weight.data_ptr()), grid,
        static_cast<int>(C));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
