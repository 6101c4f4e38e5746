// Rotary position embedding (RoPE) on the GPU, Meta's interleaved-pair layout.
//
// Formula, for each token at position p and each pair i of a head vector x (D even):
//   c = cos[p, i], s = sin[p, i]  (s negated when inverse, which is the backward)
//   out[2i]   = x[2i] * c - x[2i+1] * s
//   out[2i+1] = x[2i] * s + x[2i+1] * c
// Shapes: x (B, T, H, D) with last-dim stride 1 (other strides passed to the kernel, so q/k views
// of a fused projection need no copy), positions (B, T) int64, cos/sin (P, D/2) float32 or x's
// dtype -> out (B, T, H, D) contiguous in x's dtype. Arithmetic in float32.
//
// Memory traffic aimed at: x read once and out written once (2*B*T*H*D elements), with 16-byte
// vector loads/stores when the rows are aligned; the cos/sin rows of a token (D floats) are shared
// by its H heads and come from L1/L2. One thread per 16 bytes of x (or per pair when unaligned).
#include <torch/library.h>

#include "common.cuh"
#include "rope_kernels.cuh"

namespace llama2 {
namespace cuda {
namespace {

// rope_launch (rope_kernels.cuh) picks the vector or pair kernel and the grid: at most 32 blocks
// of 256 threads per SM, grid-stride beyond.
template <typename T, typename CT>
void launch_rope(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos,
                 const at::Tensor& sin, at::Tensor& out, bool inverse, const char* op) {
  rope_launch(reinterpret_cast<const T*>(x.data_ptr()), x.stride(0), x.stride(1), x.stride(2),
              positions.data_ptr<int64_t>(), reinterpret_cast<const CT*>(cos.data_ptr()),
              reinterpret_cast<const CT*>(sin.data_ptr()), reinterpret_cast<T*>(out.data_ptr()),
              static_cast<int>(x.size(0)), static_cast<int>(x.size(1)),
              static_cast<int>(x.size(2)), static_cast<int>(x.size(3)), cos.size(0), inverse,
              static_cast<int64_t>(sm_count()) * 32, stream_launcher(op));
}

// x (B, T, H, D), positions (B, T) int64, cos/sin (P, D/2) -> out (B, T, H, D)
at::Tensor rope_cuda(const at::Tensor& x_in, const at::Tensor& positions_in,
                     const at::Tensor& cos_in, const at::Tensor& sin_in, bool inverse) {
  const char* op = "llama2::rope";
  check_cuda(x_in, op, "x");
  check_same_device(x_in, positions_in, op, "x", "positions");
  check_same_device(x_in, cos_in, op, "x", "cos");
  check_same_device(x_in, sin_in, op, "x", "sin");
  check_dim(x_in, 4, op, "x", "(B, T, H, D)");
  check_dim(positions_in, 2, op, "positions", "(B, T)");
  check_dim(cos_in, 2, op, "cos", "(P, D/2)");
  const int64_t B = x_in.size(0), T_ = x_in.size(1), H = x_in.size(2), D = x_in.size(3);
  TORCH_CHECK(D % 2 == 0 && D > 0, op,
              ": the head dim D of x must be even (pairs are rotated), got ", D);
  TORCH_CHECK(positions_in.scalar_type() == at::kLong, op, ": positions must be int64, got ",
              positions_in.scalar_type());
  TORCH_CHECK(positions_in.size(0) == B && positions_in.size(1) == T_, op, ": positions has shape ",
              positions_in.sizes(), " but x is ", x_in.sizes(), "; positions must be (B, T) = (", B,
              ", ", T_, ")");
  TORCH_CHECK(cos_in.sizes() == sin_in.sizes(), op, ": cos has shape ", cos_in.sizes(),
              " but sin has ", sin_in.sizes(), "; they must match (both from rope_table)");
  TORCH_CHECK(cos_in.size(1) == D / 2, op, ": cos/sin have ", cos_in.size(1),
              " columns but x's head dim is ", D, "; they need D/2 = ", D / 2);
  check_same_dtype(cos_in, sin_in, op, "cos", "sin");
  TORCH_CHECK(cos_in.scalar_type() == at::kFloat || cos_in.scalar_type() == x_in.scalar_type(),
              op, ": cos/sin must be float32 or x's dtype (", x_in.scalar_type(), "), got ",
              cos_in.scalar_type());
  TORCH_CHECK(B * T_ < (int64_t(1) << 31) && H < (int64_t(1) << 31), op, ": x is too large: ",
              x_in.sizes());
  const int64_t P = cos_in.size(0);
  const c10::cuda::OptionalCUDAGuard guard(device_of(x_in));

  at::Tensor out = at::empty({B, T_, H, D}, x_in.options());
  if (out.numel() == 0) return out;
  const at::Tensor x = x_in.stride(3) == 1 ? x_in : x_in.contiguous();
  const at::Tensor positions = positions_in.contiguous();
  const at::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous();
  // positions must lie in [0, P). They are not read back here (that would be a device-to-host
  // sync on every call): the caller validates them where it makes them, and the kernel asserts.
  LLAMA2_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), op, [&] {
    if (cos.scalar_type() == at::kFloat) {
      launch_rope<scalar_t, float>(x, positions, cos, sin, out, inverse, op);
    } else {
      launch_rope<scalar_t, scalar_t>(x, positions, cos, sin, out, inverse, op);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(llama2, CUDA, m) { m.impl("rope", &rope_cuda); }

}  // namespace cuda
}  // namespace llama2
