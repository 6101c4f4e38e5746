// Pieces shared by the flash-attention forward (attention_fwd.cu) and backward (attention_bwd.cu):
// the kernel parameters, which keys a query row may see, tile loads into shared memory, and a
// warp-level matrix product on tensor cores (WMMA 16x16x16, float accumulators) or plain FMAs.
#pragma once

#include <mma.h>

#include <climits>
#include <cmath>

#include "common.cuh"

namespace llama2 {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Everything a kernel needs, passed by value. Strides are in elements; every last dim has stride 1.
struct AttnParams {
  const void* q;  // (B, Tq, H, D)
  const void* k;  // (B, Tk, KV, D)
  const void* v;  // (B, Tk, KV, D)
  int64_t q_sb, q_st, q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh;
  bool q_vec, k_vec, v_vec;  // rows start on 16-byte boundaries: tiles load 16 bytes at a time
  int B, Tq, Tk, H, KV;
  const int* cu_seqlens;  // (n_seqs + 1) int32 or nullptr
  int n_seqs;
  float scale;
  bool causal;
  // forward outputs; in the backward, out is an input
  const void* out_in;  // (B, Tq, H, D), strides below
  void* out;           // (B, Tq, H, D) contiguous
  int64_t o_sb, o_st, o_sh;
  float* lse;  // (B, H, Tq) natural-log log-sum-exp of each row's scaled scores
  // backward
  const void* dout;  // (B, Tq, H, D)
  int64_t do_sb, do_st, do_sh;
  bool do_vec;
  const float* lse_in;  // (B, H, Tq)
  float* delta;         // (B, H, Tq) rowsum(dO * O)
  float* dq_accum;      // (B, Tq, H, D) float32, zero-initialized, summed with atomics
  void* dk;             // (B, Tk, KV, D) contiguous
  void* dv;             // (B, Tk, KV, D) contiguous
};

// Packed sequence s holding token i: the largest s with cu[s] <= i (cu validated on the host:
// cu[0] == 0, nondecreasing, cu[n_seqs] == total), so cu[s] <= i < cu[s + 1].
__device__ __forceinline__ int find_seq(const int* cu, int n_seqs, int i) {
  int lo = 0, hi = n_seqs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (cu[mid] <= i)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// The keys [lo, hi) that query row i (0 <= i < Tq) attends to; empty when hi == lo.
// Causal is bottom-right aligned (query i sees keys j <= i + Tk - Tq); packed rows see only
// their own sequence.
__device__ __forceinline__ void key_range(const AttnParams& p, int i, int& lo, int& hi) {
  if (p.cu_seqlens != nullptr) {
    const int s = find_seq(p.cu_seqlens, p.n_seqs, i);
    // Clamped so that even unchecked values (graph capture) never index outside [0, Tk).
    lo = max(0, min(p.cu_seqlens[s], i));
    hi = min(p.Tk, p.causal ? i + 1 : max(p.cu_seqlens[s + 1], i + 1));
  } else {
    lo = 0;
    hi = p.causal ? static_cast<int>(min(static_cast<int64_t>(p.Tk),
                                         static_cast<int64_t>(i) + p.Tk - p.Tq + 1))
                  : p.Tk;
  }
  if (hi < lo) hi = lo;
}

// dst[r][0:D] = src row (row0 + r) for r < ROWS, zeros past n_rows (padding rows must be finite:
// a masked probability of 0 times garbage could be NaN). NT threads cooperate, consecutive
// threads on consecutive 16-byte chunks of a row (coalesced).
template <typename T, int D, int ROWS, int NT>
__device__ __forceinline__ void load_tile(T* dst, int ldd, const T* src, int64_t row_stride,
                                          int row0, int n_rows, bool vec) {
  if (vec) {
    constexpr int V = vec16<T>();
    constexpr int CH = D / V;  // 16-byte chunks per row
    for (int c = threadIdx.x; c < ROWS * CH; c += NT) {
      const int r = c / CH, col = (c % CH) * V;
      const int row = row0 + r;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (row < n_rows) {
        val = *reinterpret_cast<const uint4*>(src + static_cast<int64_t>(row) * row_stride + col);
      }
      *reinterpret_cast<uint4*>(dst + r * ldd + col) = val;
    }
  } else {
    for (int c = threadIdx.x; c < ROWS * D; c += NT) {
      const int r = c / D, col = c % D;
      const int row = row0 + r;
      dst[r * ldd + col] =
          row < n_rows ? src[static_cast<int64_t>(row) * row_stride + col] : from_float<T>(0.0f);
    }
  }
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define LLAMA2_ATTN_WMMA 1  // bf16 WMMA needs sm_80; older targets take the FMA path
#else
#define LLAMA2_ATTN_WMMA 0
#endif

// One warp computes C (16 x N) = op(A) (16 x K) @ op(B) (K x N), or C += when ACC. C is float
// in shared memory, row-major with row stride ldc. A and B are T in shared memory:
//   A_T == false: A stored row-major (16 x K), A(r, k) = a[r * lda + k]
//   A_T == true:  A stored as its transpose (K x 16 columns), A(r, k) = a[k * lda + r]
//   B_T == false: B stored row-major (K x N), B(k, n) = b[k * ldb + n]
//   B_T == true:  B stored as its transpose (N x K), B(k, n) = b[n * ldb + k]
// float16/bfloat16 on sm_80+: tensor cores through WMMA (pointers 32-byte aligned, lda/ldb
// multiples of 8, ldc a multiple of 4). float32: lane l computes row l/2, columns
// (l%2)*N/2 ... +N/2 with FMAs. The caller syncs the warp before reading C.
template <typename T, int K, int N, bool A_T, bool B_T, bool ACC>
__device__ __forceinline__ void warp_gemm(const T* a, int lda, const T* b, int ldb, float* c,
                                          int ldc) {
  static_assert(K % 16 == 0 && N % 16 == 0, "warp_gemm works on 16x16 blocks");
#if LLAMA2_ATTN_WMMA
  if constexpr (!std::is_same<T, float>::value) {
    namespace wmma = nvcuda::wmma;
    using LayoutA = std::conditional_t<A_T, wmma::col_major, wmma::row_major>;
    using LayoutB = std::conditional_t<B_T, wmma::col_major, wmma::row_major>;
#pragma unroll
    for (int nn = 0; nn < N / 16; ++nn) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      if constexpr (ACC) {
        wmma::load_matrix_sync(acc, c + nn * 16, ldc, wmma::mem_row_major);
      } else {
        wmma::fill_fragment(acc, 0.0f);
      }
#pragma unroll
      for (int kk = 0; kk < K / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayoutA> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> fb;
        wmma::load_matrix_sync(fa, A_T ? a + kk * 16 * lda : a + kk * 16, lda);
        wmma::load_matrix_sync(fb, B_T ? b + nn * 16 * ldb + kk * 16 : b + kk * 16 * ldb + nn * 16,
                               ldb);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(c + nn * 16, acc, ldc, wmma::mem_row_major);
    }
  } else
#endif
  {
    constexpr int NH = N / 2;
    const int lane = threadIdx.x & 31;
    const int r = lane >> 1, n0 = (lane & 1) * NH;
    float acc[NH];
#pragma unroll
    for (int j = 0; j < NH; ++j) acc[j] = ACC ? c[r * ldc + n0 + j] : 0.0f;
    for (int k = 0; k < K; ++k) {
      const float av = to_float(A_T ? a[k * lda + r] : a[r * lda + k]);
#pragma unroll
      for (int j = 0; j < NH; ++j) {
        acc[j] += av * to_float(B_T ? b[(n0 + j) * ldb + k] : b[k * ldb + n0 + j]);
      }
    }
#pragma unroll
    for (int j = 0; j < NH; ++j) c[r * ldc + n0 + j] = acc[j];
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

// A view with last-dim stride 1 (copied only when it is not).
inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

// 16-byte tile loads need the data pointer and the batch/token/head strides 16-byte aligned.
inline bool rows_aligned16(const at::Tensor& t) {
  const int64_t v = 16 / t.element_size();
  return aligned16(t.data_ptr()) && t.stride(0) % v == 0 && t.stride(1) % v == 0 &&
         t.stride(2) % v == 0;
}

// Checks q/k/v/cu_seqlens as the schema in csrc/ops.cpp documents them and fills the input part
// of the parameters. q, k, v must already have last-dim stride 1. cu_seqlens may be on the CPU
// (checked without a sync, then copied) or on q's device; cu_device receives the device copy.
// check_cu_values: read a CUDA cu_seqlens back to check its values (a sync).
inline AttnParams make_attn_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const c10::optional<at::Tensor>& cu_seqlens, double scale,
                                   bool causal, const char* op, at::Tensor& cu_device,
                                   bool check_cu_values) {
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

  AttnParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_sb = q.stride(0), p.q_st = q.stride(1), p.q_sh = q.stride(2);
  p.k_sb = k.stride(0), p.k_st = k.stride(1), p.k_sh = k.stride(2);
  p.v_sb = v.stride(0), p.v_st = v.stride(1), p.v_sh = v.stride(2);
  p.q_vec = rows_aligned16(q), p.k_vec = rows_aligned16(k), p.v_vec = rows_aligned16(v);
  p.B = static_cast<int>(B), p.Tq = static_cast<int>(Tq), p.Tk = static_cast<int>(Tk);
  p.H = static_cast<int>(H), p.KV = static_cast<int>(KV);
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.cu_seqlens = nullptr;
  p.n_seqs = 0;
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
    // Check the values on the host: free for a CPU tensor; a CUDA one is read back (a sync), so
    // only when asked (the forward; the backward gets the same cu_seqlens), not in graph capture.
    // Unchecked values cannot read out of bounds: the kernels clamp every key range.
    if (cu.device().is_cpu() || (check_cu_values && !capturing())) {
      const at::Tensor c = cu.cpu().contiguous();
      const int* cp = c.data_ptr<int>();
      const int64_t S = c.size(0) - 1;
      TORCH_CHECK(cp[0] == 0 && cp[S] == Tq, op,
                  ": cu_seqlens must start at 0 and end at the token count ", Tq, ", got ", cp[0],
                  " ... ", cp[S]);
      for (int64_t s = 0; s < S; ++s) {
        TORCH_CHECK(cp[s] <= cp[s + 1], op, ": cu_seqlens must be nondecreasing, got ", cp[s],
                    " then ", cp[s + 1], " at index ", s);
      }
    }
    // The caller keeps cu_device alive until the kernels are launched.
    cu_device = cu.to(q.device()).contiguous();
    p.cu_seqlens = cu_device.data_ptr<int>();
    p.n_seqs = static_cast<int>(cu.size(0) - 1);
  }
  return p;
}

}  // namespace cuda
}  // namespace llama2
