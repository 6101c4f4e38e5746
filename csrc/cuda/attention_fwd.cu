// Flash-style grouped-query attention on the GPU: the forward pass.
//
// Formula, per batch b, query head h (reading K/V head h / (H / KV)) and query row i:
//   s_j = scale * q_i . k_j over the keys j the row may see (causal bottom-right aligned, or the
//         row's own packed sequence), out_i = sum_j softmax(s)_j v_j, lse_i = log sum_j exp(s_j).
// Shapes: q (B, Tq, H, D), k/v (B, Tk, KV, D), any strides with last-dim stride 1
//   -> out (B, Tq, H, D) contiguous in q's dtype, lse (B, H, Tq) float32.
// D is a template parameter (16, 32, 48, 64, 128).
//
// Algorithm (FlashAttention, Dao et al. 2022): one block per (tile of BM query rows, h, b); each
// warp owns 16 query rows. The block streams K/V tiles of BN keys through shared memory and keeps
// an online softmax per row (running max m, running sum l, output accumulator o rescaled by
// exp(m_old - m_new)), so the Tq x Tk score matrix never exists in global memory: each warp's
// 16 x BN slice of scores lives in shared memory for one tile. S = Q K^T and O += P V run on tensor
// cores (WMMA 16x16x16, float accumulators) for float16/bfloat16, with plain FMAs for float32.
// Exponentials are base 2 with log2(e) folded into the scale.
//
// Memory traffic aimed at: Q read once, K/V read once per query tile (ceil(Tq / BM) times, from
// L2 mostly), out written once, lse written once. Causal tiles stop at the last visible key.
#include <torch/library.h>

#include "attention.cuh"

namespace llama2 {
namespace cuda {
namespace {

// q (B, Tq, H, D), k/v (B, Tk, KV, D), cu_seqlens (S+1) int32 or None
//   -> out (B, Tq, H, D), lse (B, H, Tq) float32
std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const c10::optional<at::Tensor>& cu_seqlens, double scale, bool causal) {
  const char* op = "llama2::attention_fwd";
  check_cuda(q_in, op, "q");
  const c10::cuda::OptionalCUDAGuard guard(device_of(q_in));
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in);
  const at::Tensor v = last_dim_contiguous(v_in);
  at::Tensor cu_device;
  AttnParams p = make_attn_params(q, k, v, cu_seqlens, scale, causal, op, cu_device);
  const int64_t B = q.size(0), Tq = q.size(1), H = q.size(2), D = q.size(3);
  at::Tensor out = at::empty({B, Tq, H, D}, q.options());
  at::Tensor lse = at::empty({B, H, Tq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  attn_set_forward_outputs(p, out.data_ptr(), static_cast<int>(D), lse.data_ptr<float>());
  const auto launch = stream_launcher(op);
  LLAMA2_DISPATCH_FLOAT_HALF_BF16(q.scalar_type(), op, [&] {
    switch (D) {
      case 16: attention_fwd_launch<scalar_t, 16>(p, launch); break;
      case 32: attention_fwd_launch<scalar_t, 32>(p, launch); break;
      case 48: attention_fwd_launch<scalar_t, 48>(p, launch); break;
      case 64: attention_fwd_launch<scalar_t, 64>(p, launch); break;
      default: attention_fwd_launch<scalar_t, 128>(p, launch); break;  // D checked above
    }
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(llama2, CUDA, m) { m.impl("attention_fwd", &attention_fwd_cuda); }

}  // namespace cuda
}  // namespace llama2
