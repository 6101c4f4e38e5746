// Flash-style grouped-query attention on the GPU: the backward pass.
//
// Formula, with P = softmax(S), S = scale * Q K^T (masked as in the forward), dO = grad_out:
//   delta_i = sum_d dO_id * O_id            (= sum_j P_ij dP_ij, computed first, one pass)
//   P_ij    = exp(S_ij - lse_i)             (lse saved by the forward: no second softmax pass)
//   dV_j    = sum_i P_ij dO_i
//   dP_ij   = dO_i . V_j
//   dS_ij   = P_ij (dP_ij - delta_i)
//   dQ_i    = scale * sum_j dS_ij K_j
//   dK_j    = scale * sum_i dS_ij Q_i
// Shapes: grad_out, q, out (B, Tq, H, D), k/v (B, Tk, KV, D), lse (B, H, Tq) float32
//   -> dq (B, Tq, H, D), dk/dv (B, Tk, KV, D), contiguous, in q's dtype. D is a template
//   parameter (16, 32, 48, 64, 128).
//
// Algorithm (FlashAttention-2's backward): one block per (tile of BN keys, K/V head, batch). The
// block keeps its K and V tiles and float dK/dV accumulators in shared memory and loops over the
// query heads of its group (so the GQA sum over heads needs no atomics) and over the query tiles
// that can see its keys, rebuilding P from lse. dQ is summed across key tiles with float32 atomics
// into a (B, Tq, H, D) buffer, cast at the end. All five products per tile run on tensor cores
// (WMMA) for float16/bfloat16 and on FMAs for float32. Nothing of size Tq x Tk touches global
// memory.
//
// Memory traffic aimed at: K, V read once, dK, dV written once; Q, dO, lse, delta read once per
// key tile (from L2 mostly); dQ accumulated once per key tile with atomics in L2, then cast.
#include <torch/library.h>

#include "attention.cuh"

namespace llama2 {
namespace cuda {
namespace {

// grad_out (B, Tq, H, D), q (B, Tq, H, D), k/v (B, Tk, KV, D), out (B, Tq, H, D),
// lse (B, H, Tq) float32, cu_seqlens (S+1) int32 or None -> dq, dk, dv shaped like q, k, v
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const c10::optional<at::Tensor>& cu_seqlens, double scale, bool causal) {
  const char* op = "llama2::attention_bwd";
  check_cuda(q_in, op, "q");
  const c10::cuda::OptionalCUDAGuard guard(device_of(q_in));
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in);
  const at::Tensor v = last_dim_contiguous(v_in);
  at::Tensor cu_device;
  AttnParams p = make_attn_params(q, k, v, cu_seqlens, scale, causal, op, cu_device);
  check_same_device(q_in, grad_out_in, op, "q", "grad_out");
  check_same_device(q_in, out_in, op, "q", "out");
  check_same_device(q_in, lse_in, op, "q", "lse");
  check_same_dtype(q_in, grad_out_in, op, "q", "grad_out");
  check_same_dtype(q_in, out_in, op, "q", "out");
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes(), op, ": grad_out has shape ", grad_out_in.sizes(),
              " but q has ", q_in.sizes(), "; they must match");
  TORCH_CHECK(out_in.sizes() == q_in.sizes(), op, ": out has shape ", out_in.sizes(), " but q has ",
              q_in.sizes(), "; pass the out that attention_fwd returned");
  const int64_t B = q.size(0), Tq = q.size(1), H = q.size(2), D = q.size(3);
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat, op,
              ": lse must be float32 (as attention_fwd returns it), got ", lse_in.scalar_type());
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == B && lse_in.size(1) == H &&
                  lse_in.size(2) == Tq,
              op, ": lse has shape ", lse_in.sizes(), " but must be (B, H, Tq) = (", B, ", ", H,
              ", ", Tq, "); pass the lse that attention_fwd returned");

  if (q.numel() == 0 || k.numel() == 0) {
    return {at::zeros(q.sizes(), q.options()), at::zeros(k.sizes(), k.options()),
            at::zeros(v.sizes(), v.options())};
  }
  // Every key row is written by the block of its key tile.
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());

  const at::Tensor grad_out = last_dim_contiguous(grad_out_in), out = last_dim_contiguous(out_in);
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor delta = at::empty({B, H, Tq}, q.options().dtype(at::kFloat));
  at::Tensor dq_accum = at::zeros({B, Tq, H, D}, q.options().dtype(at::kFloat));
  attn_set_backward(p, operand(out), operand(grad_out), static_cast<int>(q.element_size()),
                    lse.data_ptr<float>(), delta.data_ptr<float>(), dq_accum.data_ptr<float>(),
                    dk.data_ptr(), dv.data_ptr());
  TORCH_CHECK(attention_delta_blocks(p) < INT_MAX, op, ": too many rows (B * Tq * H = ",
              B * Tq * H, ")");
  const auto launch = stream_launcher(op);
  LLAMA2_DISPATCH_FLOAT_HALF_BF16(q.scalar_type(), op, [&] {
    switch (D) {
      case 16: attention_bwd_launch<scalar_t, 16>(p, launch); break;
      case 32: attention_bwd_launch<scalar_t, 32>(p, launch); break;
      case 48: attention_bwd_launch<scalar_t, 48>(p, launch); break;
      case 64: attention_bwd_launch<scalar_t, 64>(p, launch); break;
      default: attention_bwd_launch<scalar_t, 128>(p, launch); break;  // D checked above
    }
  });
  return {dq_accum.to(q.scalar_type()), dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(llama2, CUDA, m) { m.impl("attention_bwd", &attention_bwd_cuda); }

}  // namespace cuda
}  // namespace llama2
