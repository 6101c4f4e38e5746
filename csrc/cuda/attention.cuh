// Host side of the flash-attention ops (attention_fwd.cu, attention_bwd.cu): input checks, then
// the kernel parameters from attn_params. The kernels, their parameters and launches (shared with
// the CPU emulation) are in attention_kernels.cuh.
#pragma once

#include <climits>
#include <cmath>

#include "attention_kernels.cuh"
#include "common.cuh"

namespace llama2 {
namespace cuda {

// A view with last-dim stride 1 (copied only when it is not).
inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

// A (B, T, heads, D) tensor as the kernels see it.
inline AttnOperand operand(const at::Tensor& t) {
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

// Checks q/k/v/cu_seqlens as the schema in csrc/ops.cpp documents them and fills the input part
// of the parameters. q, k, v must already have last-dim stride 1. Nothing here reads device memory
// back (no device-to-host sync per call): the values of a CUDA cu_seqlens (starts at 0,
// nondecreasing, ends at Tq) are the caller's to validate where it makes them, and the kernels
// clamp every key range so that bad values cannot read or write out of bounds. A CPU cu_seqlens is
// checked here for free and copied to the GPU without a stream sync; cu_device receives the
// device copy.
inline AttnParams make_attn_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const c10::optional<at::Tensor>& cu_seqlens, double scale,
                                   bool causal, const char* op, at::Tensor& cu_device) {
  check_cuda(q, op, "q");
  check_same_device(q, k, op, "q", "k");
  check_same_device(q, v, op, "q", "v");
  check_same_dtype(q, k, op, "q", "k");
  check_same_dtype(q, v, op, "q", "v");
  check_dim(q, 4, op, "q", "(B, Tq, H, D)");
  check_dim(k, 4, op, "k", "(B, Tk, KV, D)");
  check_dim(v, 4, op, "v", "(B, Tk, KV, D)");
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k has shape ", k.sizes(), " but v has ", v.sizes(),
              "; they must match (B, Tk, KV, D)");
  const int64_t B = q.size(0), Tq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Tk = k.size(1), KV = k.size(2);
  TORCH_CHECK(k.size(0) == B, op, ": q has batch ", B, " but k/v have ", k.size(0),
              "; they must match");
  TORCH_CHECK(k.size(3) == D, op, ": q has head dim ", D, " but k/v have ", k.size(3),
              "; they must match");
  TORCH_CHECK(KV > 0 && H % KV == 0, op, ": the number of query heads (", H,
              ") must be a multiple of the number of key/value heads (", KV, ")");
  // 32, 64, 128 for real models; 16 and 48 for the small presets (any multiple of 16 would work,
  // each one is another set of compiled kernels).
  TORCH_CHECK(D == 16 || D == 32 || D == 48 || D == 64 || D == 128, op,
              ": the CUDA kernel supports head dim 16, 32, 48, 64 or 128, got ", D,
              "; use the reference path for other sizes");
  TORCH_CHECK(B <= 65535 && H <= 65535, op, ": at most 65535 batch rows and 65535 heads, got B=",
              B, " H=", H);
  TORCH_CHECK(Tq < INT_MAX && Tk < INT_MAX, op,
              ": sequences longer than 2^31 - 1 tokens are not supported");
  TORCH_CHECK(std::isfinite(scale) && scale > 0.0, op,
              ": scale must be a positive finite number, got ", scale);
  TORCH_CHECK(cu_seqlens.has_value() || !causal || Tq <= Tk, op,
              ": causal attention needs Tq <= Tk (queries are the last Tq of the Tk positions), "
              "got Tq=", Tq, " and Tk=", Tk);

  const int* cu_ptr = nullptr;
  int n_seqs = 0;
  if (cu_seqlens.has_value()) {
    const at::Tensor& cu = *cu_seqlens;
    TORCH_CHECK(cu.device().is_cpu() || cu.device() == q.device(), op, ": cu_seqlens is on ",
                cu.device(), " but q is on ", q.device(),
                "; pass cu_seqlens on q's device (or on the CPU)");
    TORCH_CHECK(cu.scalar_type() == at::kInt, op, ": cu_seqlens must be int32, got ",
                cu.scalar_type());
    check_dim(cu, 1, op, "cu_seqlens", "(S+1)");
    TORCH_CHECK(cu.size(0) >= 2, op,
                ": cu_seqlens needs at least 2 entries (0 and the total), got ", cu.size(0));
    TORCH_CHECK(B == 1 && Tq == Tk, op,
                ": packed sequences (cu_seqlens) need B == 1 and Tq == Tk, got B=", B, " Tq=", Tq,
                " Tk=", Tk);
    if (cu.device().is_cpu()) {
      const at::Tensor c = cu.contiguous();
      const int* cp = c.data_ptr<int>();
      const int64_t S = c.size(0) - 1;
      TORCH_CHECK(cp[0] == 0 && cp[S] == Tq, op,
                  ": cu_seqlens must start at 0 and end at the token count ", Tq, ", got ", cp[0],
                  " ... ", cp[S]);
      for (int64_t s = 0; s < S; ++s) {
        TORCH_CHECK(cp[s] <= cp[s + 1], op, ": cu_seqlens must be nondecreasing, got ", cp[s],
                    " then ", cp[s + 1], " at index ", s);
      }
      // non_blocking: the pageable source is staged at once, no wait for the stream.
      cu_device = c.to(q.device(), /*non_blocking=*/true);
    } else {
      cu_device = cu.contiguous();
    }
    // The caller keeps cu_device alive until the kernels are launched.
    cu_ptr = cu_device.data_ptr<int>();
    n_seqs = static_cast<int>(cu.size(0) - 1);
  }
  return attn_params(operand(q), operand(k), operand(v), static_cast<int>(q.element_size()),
                     static_cast<int>(B), static_cast<int>(Tq), static_cast<int>(Tk),
                     static_cast<int>(H), static_cast<int>(KV), static_cast<float>(scale), causal,
                     cu_ptr, n_seqs);
}

}  // namespace cuda
}  // namespace llama2
