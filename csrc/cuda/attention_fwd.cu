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
  extern __shared__ __align__(128) unsigned char smem[];
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

template <typename T, int D>
void launch_fwd(const AttnParams& p, const char* op) {
  // 4 warps (64 query rows) on tensor cores; 2 warps for float32, whose tiles take twice the bytes.
  constexpr int WARPS = std::is_same<T, float>::value ? 2 : 4;
  using L = FwdLayout<T, D, WARPS>;
  auto kernel = attention_fwd_kernel<T, D, WARPS>;
  set_shared_memory(kernel, L::bytes, op);
  const dim3 grid((p.Tq + L::BM - 1) / L::BM, p.H, p.B);
  kernel<<<grid, L::NT, L::bytes, current_stream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

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
  AttnParams p = make_attn_params(q, k, v, cu_seqlens, scale, causal, op, cu_device,
                                  /*check_cu_values=*/true);
  const int64_t B = q.size(0), Tq = q.size(1), H = q.size(2), D = q.size(3);
  at::Tensor out = at::empty({B, Tq, H, D}, q.options());
  at::Tensor lse = at::empty({B, H, Tq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  p.out = out.data_ptr();
  p.o_sb = out.stride(0), p.o_st = out.stride(1), p.o_sh = out.stride(2);
  p.lse = lse.data_ptr<float>();
  LLAMA2_DISPATCH_FLOAT_HALF_BF16(q.scalar_type(), op, [&] {
    switch (D) {
      case 16: launch_fwd<scalar_t, 16>(p, op); break;
      case 32: launch_fwd<scalar_t, 32>(p, op); break;
      case 48: launch_fwd<scalar_t, 48>(p, op); break;
      case 64: launch_fwd<scalar_t, 64>(p, op); break;
      default: launch_fwd<scalar_t, 128>(p, op); break;  // D checked above
    }
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(llama2, CUDA, m) { m.impl("attention_fwd", &attention_fwd_cuda); }

}  // namespace cuda
}  // namespace llama2
