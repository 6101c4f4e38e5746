// The flash-attention kernels: the device code of attention_fwd.cu and attention_bwd.cu (which
// launch them), in a header so that tests/cuda_emu can compile the same code for the CPU. Here:
// the kernel parameters, which keys a query row may see, tile loads into shared memory, a
// warp-level matrix product on tensor cores (WMMA 16x16x16, float accumulators) or plain FMAs,
// then the forward kernel and the two backward kernels with their shared-memory layouts and block
// sizes. The formulas, shapes and memory traffic are in the .cu files' header comments.
#pragma once

#ifndef LLAMA2_CUDA_EMULATION
#include <mma.h>
#endif

#include <climits>
#include <cmath>
#include <type_traits>

#include "device.cuh"

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

// Packed sequence s holding token i: the largest s with cu[s] <= i (cu[0] == 0, nondecreasing,
// cu[n_seqs] == total, as the caller validates where it makes cu_seqlens), so
// cu[s] <= i < cu[s + 1]. Reads only cu[0 .. n_seqs - 1], whatever the values.
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
    // Clamped: the op does not read cu_seqlens back to check it (that would sync), so even bad
    // values must never index outside [0, Tk).
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

#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(LLAMA2_CUDA_EMULATION)
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
    // Unrolled by 8: with the loop rolled, ptxas spilled registers for D = 16 and 48 (the
    // register test in tests/test_cuda_resources.py).
#pragma unroll 8
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
// Block sizes (warps per block), shared by the launchers and the CPU emulation
// ---------------------------------------------------------------------------------------------

// Forward: 4 warps (64 query rows) on tensor cores; 2 warps for float32, whose tiles take twice
// the bytes.
template <typename T>
constexpr int fwd_warps() {
  return std::is_same<T, float>::value ? 2 : 4;
}

// Backward: 2 warps (32 keys, 32-row query tiles): the block holds K, V, dK, dV, Q, dO and three
// score tiles, about 96 KB for D = 128 in 16-bit, so two blocks fit on an SM.
constexpr int kBwdWarps = 2;

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// Shared memory layout of the forward block: Q, K, V tiles (T), a float scratch for each warp's
// scores and then its P @ V product, the probabilities P (T), and each row's key range. Every
// region starts on a 256-byte boundary and every row stride keeps 16x16 fragments 32-byte aligned.
template <typename T, int D, int WARPS>
struct FwdLayout {
  static constexpr int BM = 16 * WARPS;  // query rows per block
  static constexpr int BN = 16 * WARPS;  // keys per tile
  static constexpr int NT = 32 * WARPS;  // threads
  static constexpr int LDT = D + vec16<T>();            // Q/K/V rows, padded 16 bytes
  static constexpr int LDS = (D > BN ? D : BN) + 4;     // float scratch rows
  static constexpr int LDP = BN + vec16<T>();           // P rows
  static constexpr size_t q_off = 0;
  static constexpr size_t k_off = q_off + sizeof(T) * BM * LDT;
  static constexpr size_t v_off = k_off + sizeof(T) * BN * LDT;
  static constexpr size_t s_off = v_off + sizeof(T) * BN * LDT;
  static constexpr size_t p_off = s_off + sizeof(float) * BM * LDS;
  static constexpr size_t r_off = p_off + sizeof(T) * BM * LDP;
  static constexpr size_t bytes = r_off + sizeof(int) * (2 * BM + 2);
};

template <typename T, int D, int WARPS>
__global__ void __launch_bounds__(32 * WARPS) attention_fwd_kernel(const AttnParams p) {
  using L = FwdLayout<T, D, WARPS>;
  constexpr int BM = L::BM, BN = L::BN, NT = L::NT, LDT = L::LDT, LDS = L::LDS, LDP = L::LDP;
  constexpr int SC = BN / 2;  // score columns per lane
  constexpr int OC = D / 2;   // output columns per lane
  unsigned char* smem = dynamic_smem();
  T* Qs = reinterpret_cast<T*>(smem + L::q_off);       // (BM, LDT)
  T* Ks = reinterpret_cast<T*>(smem + L::k_off);       // (BN, LDT)
  T* Vs = reinterpret_cast<T*>(smem + L::v_off);       // (BN, LDT)
  float* Sc = reinterpret_cast<float*>(smem + L::s_off);  // (BM, LDS)
  T* Ps = reinterpret_cast<T*>(smem + L::p_off);       // (BM, LDP)
  int* row_lo = reinterpret_cast<int*>(smem + L::r_off);  // (BM)
  int* row_hi = row_lo + BM;                              // (BM)
  int* span = row_hi + BM;                                // keys [span[0], span[1]) of the block

  const int m0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
  const int kv_head = h / (p.H / p.KV);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const T* qb = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* kb = static_cast<const T*>(p.k) + b * p.k_sb + kv_head * p.k_sh;
  const T* vb = static_cast<const T*>(p.v) + b * p.v_sb + kv_head * p.v_sh;

  // Each row's visible keys, the Q tile, and the union of the rows' key ranges.
  for (int r = tid; r < BM; r += NT) {
    int lo = 0, hi = 0;
    if (m0 + r < p.Tq) key_range(p, m0 + r, lo, hi);
    row_lo[r] = lo;
    row_hi[r] = hi;
  }
  load_tile<T, D, BM, NT>(Qs, LDT, qb, p.q_st, m0, p.Tq, p.q_vec);
  __syncthreads();
  if (tid == 0) {
    int begin = INT_MAX, end = 0;
    for (int r = 0; r < BM; ++r) {
      if (row_hi[r] > row_lo[r]) {
        begin = min(begin, row_lo[r]);
        end = max(end, row_hi[r]);
      }
    }
    span[0] = begin == INT_MAX ? 0 : begin;
    span[1] = end;
  }
  __syncthreads();
  const int n_begin = span[0], n_end = span[1];

  // Lane l of warp w handles row w*16 + l/2: score columns (l%2)*SC.., output columns (l%2)*OC..
  const int row = warp * 16 + (lane >> 1), half = lane & 1;
  const int lo = row_lo[row], hi = row_hi[row];
  float* srow = Sc + row * LDS;
  T* prow = Ps + row * LDP;
  float o[OC];
#pragma unroll
  for (int k = 0; k < OC; ++k) o[k] = 0.0f;
  float m = -INFINITY, l = 0.0f;  // running max (log2 units) and running sum of the row
  const float scale_log2 = p.scale * kLog2e;

  for (int n0 = n_begin; n0 < n_end; n0 += BN) {
    __syncthreads();  // every warp is done with the previous K/V tile
    load_tile<T, D, BN, NT>(Ks, LDT, kb, p.k_st, n0, p.Tk, p.k_vec);
    load_tile<T, D, BN, NT>(Vs, LDT, vb, p.v_st, n0, p.Tk, p.v_vec);
    __syncthreads();

    // S (16 x BN) = Q (16 x D) @ K^T for this warp's rows.
    warp_gemm<T, D, BN, false, true, false>(Qs + warp * 16 * LDT, LDT, Ks, LDT,
                                            Sc + warp * 16 * LDS, LDS);
    __syncwarp();

    // Online softmax: masked scores are -inf; the two lanes of a row combine through a shuffle.
    float mx = -INFINITY;
#pragma unroll
    for (int c = 0; c < SC; ++c) {
      const int col = half * SC + c, j = n0 + col;
      const float s = (j >= lo && j < hi) ? srow[col] * scale_log2 : -INFINITY;
      srow[col] = s;
      mx = fmaxf(mx, s);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_new = fmaxf(m, mx);
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // a row with no key yet stays at 0
    const float alpha = exp2f(m - m_use);
    float sum = 0.0f;
#pragma unroll
    for (int c = 0; c < SC; ++c) {
      const int col = half * SC + c;
      const float pv = exp2f(srow[col] - m_use);
      prow[col] = from_float<T>(pv);
      sum += pv;
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l = l * alpha + sum;
    m = m_new;
    __syncwarp();

    // PV (16 x D) = P (16 x BN) @ V (BN x D), into the scratch the scores just left.
    warp_gemm<T, BN, D, false, false, false>(Ps + warp * 16 * LDP, LDP, Vs, LDT,
                                             Sc + warp * 16 * LDS, LDS);
    __syncwarp();
#pragma unroll
    for (int k = 0; k < OC; k += 4) {
      const float4 pv = *reinterpret_cast<const float4*>(srow + half * OC + k);
      o[k] = o[k] * alpha + pv.x;
      o[k + 1] = o[k + 1] * alpha + pv.y;
      o[k + 2] = o[k + 2] * alpha + pv.z;
      o[k + 3] = o[k + 3] * alpha + pv.w;
    }
  }

  // out = o / l; a row that sees no key gets out = 0 and lse = -inf.
  const int i = m0 + row;
  if (i < p.Tq) {
    const float inv_l = l > 0.0f ? 1.0f / l : 0.0f;
    constexpr int V = vec16<T>();
    T* orow = static_cast<T*>(p.out) + ((static_cast<int64_t>(b) * p.Tq + i) * p.H + h) * D +
              half * OC;
#pragma unroll
    for (int k = 0; k < OC; k += V) {
      Vec<T, V> ov;
#pragma unroll
      for (int e = 0; e < V; ++e) ov.v[e] = from_float<T>(o[k + e] * inv_l);
      *reinterpret_cast<Vec<T, V>*>(orow + k) = ov;
    }
    if (half == 0) {
      p.lse[(static_cast<int64_t>(b) * p.H + h) * p.Tq + i] =
          l > 0.0f ? (m + log2f(l)) * kLn2 : -INFINITY;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// delta[b, h, i] = sum_d dO[b, i, h, d] * O[b, i, h, d]; one warp per row.
template <typename T>
__global__ void attention_delta_kernel(const AttnParams p, int D) {
  const int64_t n_rows = static_cast<int64_t>(p.B) * p.Tq * p.H;
  const int64_t warp_id = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp_id >= n_rows) return;
  // warp_id = (b * Tq + i) * H + h
  const int h = static_cast<int>(warp_id % p.H);
  const int64_t bi = warp_id / p.H;
  const int i = static_cast<int>(bi % p.Tq);
  const int b = static_cast<int>(bi / p.Tq);
  const T* o = static_cast<const T*>(p.out_in) + b * p.o_sb + i * p.o_st + h * p.o_sh;
  const T* g = static_cast<const T*>(p.dout) + b * p.do_sb + i * p.do_st + h * p.do_sh;
  float s = 0.0f;
  for (int d = lane; d < D; d += 32) s += to_float(o[d]) * to_float(g[d]);
  s = warp_sum(s);
  if (lane == 0) p.delta[(static_cast<int64_t>(b) * p.H + h) * p.Tq + i] = s;
}

// Shared memory of the backward block. T tiles: K, V (the block's keys), Q, dO (the current
// query tile). float: dK, dV accumulators, the scores S (later dQ), dP. T: P, dS. Then per query
// row its key range, lse (log2 units) and delta. Regions start on 256-byte boundaries.
template <typename T, int D, int WARPS>
struct BwdLayout {
  static constexpr int BM = 16 * WARPS;  // query rows per tile
  static constexpr int BN = 16 * WARPS;  // keys per block
  static constexpr int NT = 32 * WARPS;
  static constexpr int LDT = D + vec16<T>();         // K/V/Q/dO rows
  static constexpr int LDA = D + 4;                  // dK/dV accumulator rows
  static constexpr int LDS = (D > BN ? D : BN) + 4;  // S rows, then dQ rows
  static constexpr int LDD = BN + 4;                 // dP rows
  static constexpr int LDP = BN + vec16<T>();        // P/dS rows
  static constexpr size_t k_off = 0;
  static constexpr size_t v_off = k_off + sizeof(T) * BN * LDT;
  static constexpr size_t q_off = v_off + sizeof(T) * BN * LDT;
  static constexpr size_t do_off = q_off + sizeof(T) * BM * LDT;
  static constexpr size_t dk_off = do_off + sizeof(T) * BM * LDT;
  static constexpr size_t dv_off = dk_off + sizeof(float) * BN * LDA;
  static constexpr size_t s_off = dv_off + sizeof(float) * BN * LDA;
  static constexpr size_t dp_off = s_off + sizeof(float) * BM * LDS;
  static constexpr size_t p_off = dp_off + sizeof(float) * BM * LDD;
  static constexpr size_t ds_off = p_off + sizeof(T) * BM * LDP;
  static constexpr size_t r_off = ds_off + sizeof(T) * BM * LDP;
  static constexpr size_t bytes = r_off + sizeof(int) * 4 * BM;
};

template <typename T, int D, int WARPS>
__global__ void __launch_bounds__(32 * WARPS) attention_bwd_kernel(const AttnParams p) {
  using L = BwdLayout<T, D, WARPS>;
  constexpr int BM = L::BM, BN = L::BN, NT = L::NT;
  constexpr int LDT = L::LDT, LDA = L::LDA, LDS = L::LDS, LDD = L::LDD, LDP = L::LDP;
  constexpr int SC = BN / 2;  // score columns per lane
  unsigned char* smem = dynamic_smem();
  T* Ks = reinterpret_cast<T*>(smem + L::k_off);            // (BN, LDT)
  T* Vs = reinterpret_cast<T*>(smem + L::v_off);            // (BN, LDT)
  T* Qs = reinterpret_cast<T*>(smem + L::q_off);            // (BM, LDT)
  T* dOs = reinterpret_cast<T*>(smem + L::do_off);          // (BM, LDT)
  float* dKa = reinterpret_cast<float*>(smem + L::dk_off);  // (BN, LDA)
  float* dVa = reinterpret_cast<float*>(smem + L::dv_off);  // (BN, LDA)
  float* Sc = reinterpret_cast<float*>(smem + L::s_off);    // (BM, LDS)
  float* dPc = reinterpret_cast<float*>(smem + L::dp_off);  // (BM, LDD)
  T* Ps = reinterpret_cast<T*>(smem + L::p_off);            // (BM, LDP)
  T* dSs = reinterpret_cast<T*>(smem + L::ds_off);          // (BM, LDP)
  int* row_lo = reinterpret_cast<int*>(smem + L::r_off);    // (BM)
  int* row_hi = row_lo + BM;                                // (BM)
  float* row_lse = reinterpret_cast<float*>(row_hi + BM);   // (BM) lse * log2(e)
  float* row_delta = row_lse + BM;                          // (BM)

  const int n0 = blockIdx.x * BN, kv_head = blockIdx.y, b = blockIdx.z;
  const int G = p.H / p.KV;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const T* kb = static_cast<const T*>(p.k) + b * p.k_sb + kv_head * p.k_sh;
  const T* vb = static_cast<const T*>(p.v) + b * p.v_sb + kv_head * p.v_sh;

  load_tile<T, D, BN, NT>(Ks, LDT, kb, p.k_st, n0, p.Tk, p.k_vec);
  load_tile<T, D, BN, NT>(Vs, LDT, vb, p.v_st, n0, p.Tk, p.v_vec);
  for (int idx = tid; idx < BN * LDA; idx += NT) {
    dKa[idx] = 0.0f;
    dVa[idx] = 0.0f;
  }

  // The query rows that can see at least one key of [n0, n_last].
  const int n_last = min(n0 + BN, p.Tk) - 1;
  int q_begin, q_end;
  if (p.cu_seqlens != nullptr) {
    const int s_first = find_seq(p.cu_seqlens, p.n_seqs, n0);
    const int s_last = find_seq(p.cu_seqlens, p.n_seqs, n_last);
    q_begin = max(0, p.causal ? n0 : p.cu_seqlens[s_first]);
    q_end = min(p.Tq, p.cu_seqlens[s_last + 1]);
  } else {
    q_begin = p.causal ? max(0, n0 - (p.Tk - p.Tq)) : 0;
    q_end = p.Tq;
  }

  // Lane l of warp w handles query row w*16 + l/2, key columns (l%2)*SC .. +SC.
  const int row = warp * 16 + (lane >> 1), half = lane & 1;
  const float scale_log2 = p.scale * kLog2e;

  for (int hh = 0; hh < G; ++hh) {
    const int h = kv_head * G + hh;
    const T* qb = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
    const T* dob = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh;
    const float* lse_h = p.lse_in + (static_cast<int64_t>(b) * p.H + h) * p.Tq;
    const float* delta_h = p.delta + (static_cast<int64_t>(b) * p.H + h) * p.Tq;

    for (int m0 = q_begin; m0 < q_end; m0 += BM) {
      __syncthreads();  // every warp is done with the previous Q/dO/P/dS tiles (and S/dQ scratch)
      load_tile<T, D, BM, NT>(Qs, LDT, qb, p.q_st, m0, p.Tq, p.q_vec);
      load_tile<T, D, BM, NT>(dOs, LDT, dob, p.do_st, m0, p.Tq, p.do_vec);
      for (int r = tid; r < BM; r += NT) {
        const int i = m0 + r;
        int lo = 0, hi = 0;
        float lse2 = 0.0f, dlt = 0.0f;
        if (i < p.Tq) {
          key_range(p, i, lo, hi);
          lse2 = lse_h[i] * kLog2e;
          dlt = delta_h[i];
        }
        row_lo[r] = lo;
        row_hi[r] = hi;
        row_lse[r] = lse2;
        row_delta[r] = dlt;
      }
      __syncthreads();

      // S = Q K^T and dP = dO V^T for this warp's 16 query rows (16 x BN each).
      warp_gemm<T, D, BN, false, true, false>(Qs + warp * 16 * LDT, LDT, Ks, LDT,
                                              Sc + warp * 16 * LDS, LDS);
      warp_gemm<T, D, BN, false, true, false>(dOs + warp * 16 * LDT, LDT, Vs, LDT,
                                              dPc + warp * 16 * LDD, LDD);
      __syncwarp();

      // P = exp(S * scale - lse), dS = P (dP - delta); masked entries are exactly 0.
      {
        const int lo = row_lo[row], hi = row_hi[row];
        const float lse2 = row_lse[row], dlt = row_delta[row];
#pragma unroll
        for (int c = 0; c < SC; ++c) {
          const int col = half * SC + c, j = n0 + col;
          float pr = 0.0f, ds = 0.0f;
          if (j >= lo && j < hi) {
            pr = exp2f(Sc[row * LDS + col] * scale_log2 - lse2);
            ds = pr * (dPc[row * LDD + col] - dlt);
          }
          Ps[row * LDP + col] = from_float<T>(pr);
          dSs[row * LDP + col] = from_float<T>(ds);
        }
      }
      __syncthreads();  // dV and dK read P and dS columns written by every warp

      // dV (warp's 16 keys x D) += P^T dO ; dK += dS^T Q (scaled at the end).
      warp_gemm<T, BM, D, true, false, true>(Ps + warp * 16, LDP, dOs, LDT,
                                             dVa + warp * 16 * LDA, LDA);
      warp_gemm<T, BM, D, true, false, true>(dSs + warp * 16, LDP, Qs, LDT,
                                             dKa + warp * 16 * LDA, LDA);
      // dQ (warp's 16 query rows x D) = dS K, into this warp's rows of the score scratch.
      warp_gemm<T, BN, D, false, false, false>(dSs + warp * 16 * LDP, LDP, Ks, LDT,
                                               Sc + warp * 16 * LDS, LDS);
      __syncwarp();
      for (int idx = lane; idx < 16 * D; idx += 32) {
        const int r = idx / D, col = idx % D;
        const int i = m0 + warp * 16 + r;
        if (i < p.Tq) {
          atomicAdd(p.dq_accum + ((static_cast<int64_t>(b) * p.Tq + i) * p.H + h) * D + col,
                    p.scale * Sc[(warp * 16 + r) * LDS + col]);
        }
      }
    }
  }
  __syncthreads();

  // dK = scale * dK_acc, dV = dV_acc for the block's keys.
  T* dkb = static_cast<T*>(p.dk);
  T* dvb = static_cast<T*>(p.dv);
  for (int idx = tid; idx < BN * D; idx += NT) {
    const int r = idx / D, col = idx % D;
    const int n = n0 + r;
    if (n < p.Tk) {
      const int64_t off = ((static_cast<int64_t>(b) * p.Tk + n) * p.KV + kv_head) * D + col;
      dkb[off] = from_float<T>(p.scale * dKa[r * LDA + col]);
      dvb[off] = from_float<T>(dVa[r * LDA + col]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: the parameters and the launches (see device.cuh), after the launchers' input checks
// (attention.cuh)
// ---------------------------------------------------------------------------------------------

// A (B, T, heads, D) tensor as the kernels see it: data pointer and strides in elements (the last
// dim has stride 1).
struct AttnOperand {
  const void* data;
  int64_t sb, st, sh;
};

// 16-byte tile loads need the data pointer and the batch/token/head strides 16-byte aligned.
inline bool rows_aligned16(const AttnOperand& t, int element_size) {
  const int64_t v = 16 / element_size;
  return aligned16(t.data) && t.sb % v == 0 && t.st % v == 0 && t.sh % v == 0;
}

// The input part of the parameters: q (B, Tq, H, D), k/v (B, Tk, KV, D) of element_size bytes,
// cu_seqlens (n_seqs + 1) or nullptr.
inline AttnParams attn_params(const AttnOperand& q, const AttnOperand& k, const AttnOperand& v,
                              int element_size, int B, int Tq, int Tk, int H, int KV,
                              float scale, bool causal, const int* cu_seqlens, int n_seqs) {
  AttnParams p{};
  p.q = q.data, p.k = k.data, p.v = v.data;
  p.q_sb = q.sb, p.q_st = q.st, p.q_sh = q.sh;
  p.k_sb = k.sb, p.k_st = k.st, p.k_sh = k.sh;
  p.v_sb = v.sb, p.v_st = v.st, p.v_sh = v.sh;
  p.q_vec = rows_aligned16(q, element_size);
  p.k_vec = rows_aligned16(k, element_size);
  p.v_vec = rows_aligned16(v, element_size);
  p.B = B, p.Tq = Tq, p.Tk = Tk, p.H = H, p.KV = KV;
  p.scale = scale;
  p.causal = causal;
  p.cu_seqlens = cu_seqlens;
  p.n_seqs = cu_seqlens != nullptr ? n_seqs : 0;
  return p;
}

// The forward's outputs: out (B, Tq, H, D) contiguous, lse (B, H, Tq).
inline void attn_set_forward_outputs(AttnParams& p, void* out, int D, float* lse) {
  p.out = out;
  p.o_sb = static_cast<int64_t>(p.Tq) * p.H * D, p.o_st = static_cast<int64_t>(p.H) * D;
  p.o_sh = D;
  p.lse = lse;
}

// The backward's inputs and outputs: out and dout (B, Tq, H, D) as the forward's out and its
// gradient, lse (B, H, Tq), the delta scratch (B, H, Tq), dq_accum (B, Tq, H, D) float32 zeros,
// dk/dv (B, Tk, KV, D) contiguous.
inline void attn_set_backward(AttnParams& p, const AttnOperand& out, const AttnOperand& dout,
                              int element_size, const float* lse, float* delta, float* dq_accum,
                              void* dk, void* dv) {
  p.out_in = out.data;
  p.o_sb = out.sb, p.o_st = out.st, p.o_sh = out.sh;
  p.dout = dout.data;
  p.do_sb = dout.sb, p.do_st = dout.st, p.do_sh = dout.sh;
  p.do_vec = rows_aligned16(dout, element_size);
  p.lse_in = lse;
  p.delta = delta;
  p.dq_accum = dq_accum;
  p.dk = dk;
  p.dv = dv;
}

// The forward: one block per (tile of BM query rows, head, batch).
template <typename T, int D, typename Launch>
void attention_fwd_launch(const AttnParams& p, Launch&& launch) {
  constexpr int WARPS = fwd_warps<T>();
  using L = FwdLayout<T, D, WARPS>;
  const dim3 grid((p.Tq + L::BM - 1) / L::BM, p.H, p.B);
  launch(attention_fwd_kernel<T, D, WARPS>, LaunchConfig{grid, L::NT, L::bytes}, p);
}

// Blocks of kDeltaThreads threads for the backward's delta kernel (one warp per query row); the
// launcher checks that they are fewer than INT_MAX.
constexpr int kDeltaThreads = 256;
inline int64_t attention_delta_blocks(const AttnParams& p) {
  const int64_t n_rows = static_cast<int64_t>(p.B) * p.Tq * p.H;
  return (n_rows * 32 + kDeltaThreads - 1) / kDeltaThreads;
}

// The backward: delta, then one block per (tile of BN keys, K/V head, batch).
template <typename T, int D, typename Launch>
void attention_bwd_launch(const AttnParams& p, Launch&& launch) {
  constexpr int WARPS = kBwdWarps;
  using L = BwdLayout<T, D, WARPS>;
  launch(attention_delta_kernel<T>,
         LaunchConfig{static_cast<unsigned>(attention_delta_blocks(p)), kDeltaThreads}, p, D);
  const dim3 grid((p.Tk + L::BN - 1) / L::BN, p.KV, p.B);
  launch(attention_bwd_kernel<T, D, WARPS>, LaunchConfig{grid, L::NT, L::bytes}, p);
}

}  // namespace cuda
}  // namespace llama2
