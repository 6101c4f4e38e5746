// The schemas of every llama2 op, in one place.
//
// Kernels register per device beside their code (csrc/cpu/*.cpp, csrc/cuda/*.cu) with
// TORCH_LIBRARY_IMPL(llama2, CPU/CUDA, m). Autograd formulas and fake (meta) kernels are
// registered from Python in llama2_kernels.py, so the ops work under autograd,
// torch.compile(fullgraph=True) and torch.library.opcheck.
//
// Shapes (B batch, T tokens, H query heads, KV key/value heads, D head dim, N rows):
//   rms_norm_fwd   x (..., C), weight (C)            -> out (..., C), rstd (N), N = numel/C
//                  (rstd and lse below are float32, or float64 for float64 inputs: exact gradcheck)
//   rms_norm_bwd   grad_out, x (..., C), weight (C), rstd (N) -> grad_x (..., C), grad_weight (C)
//   rope           x (B, T, H, D) D even, positions (B, T) int64, cos/sin (P, D/2) -> (B, T, H, D)
//                  Meta's interleaved pairs (x[2i], x[2i+1]) rotated by positions*freq_i;
//                  inverse=True rotates by the negative angle (that is the backward).
//   attention_fwd  q (B, Tq, H, D), k/v (B, Tk, KV, D), H % KV == 0
//                  -> out (B, Tq, H, D), lse (B, H, Tq) (natural-log log-sum-exp per row)
//                  causal is bottom-right aligned: query i sees keys j <= i + (Tk - Tq).
//                  cu_seqlens (S+1) int32, when given: packed sequences, B == 1, Tq == Tk,
//                  causal within each sequence, nothing across sequences.
//   attention_bwd  grad_out, q, k, v, out, lse, cu_seqlens, scale, causal -> dq, dk, dv
#include <torch/library.h>

TORCH_LIBRARY(llama2, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)");
  m.def("rope(Tensor x, Tensor positions, Tensor cos, Tensor sin, bool inverse) -> Tensor");
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens, float scale, bool causal)"
        " -> (Tensor, Tensor)");
  m.def("attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
        " Tensor? cu_seqlens, float scale, bool causal) -> (Tensor, Tensor, Tensor)");
}
