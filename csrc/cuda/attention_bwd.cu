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
  extern __shared__ __align__(128) unsigned char smem[];
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

template <typename T, int D>
void launch_bwd(const AttnParams& p, const char* op) {
  // 2 warps (32 keys, 32-row query tiles): the block holds K, V, dK, dV, Q, dO and three score
  // tiles, about 96 KB for D = 128 in 16-bit, so two blocks fit on an SM.
  constexpr int WARPS = 2;
  using L = BwdLayout<T, D, WARPS>;
  const int64_t n_rows = static_cast<int64_t>(p.B) * p.Tq * p.H;
  const int threads = 256;
  const int64_t blocks = (n_rows * 32 + threads - 1) / threads;
  TORCH_CHECK(blocks < INT_MAX, op, ": too many rows (", n_rows, ")");
  attention_delta_kernel<T><<<static_cast<int>(blocks), threads, 0, current_stream()>>>(p, D);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto kernel = attention_bwd_kernel<T, D, WARPS>;
  set_shared_memory(kernel, L::bytes, op);
  const dim3 grid((p.Tk + L::BN - 1) / L::BN, p.KV, p.B);
  kernel<<<grid, L::NT, L::bytes, current_stream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

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
  AttnParams p = make_attn_params(q, k, v, cu_seqlens, scale, causal, op, cu_device,
                                  /*check_cu_values=*/false);
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
  p.out_in = out.data_ptr();
  p.o_sb = out.stride(0), p.o_st = out.stride(1), p.o_sh = out.stride(2);
  p.dout = grad_out.data_ptr();
  p.do_sb = grad_out.stride(0), p.do_st = grad_out.stride(1), p.do_sh = grad_out.stride(2);
  p.do_vec = rows_aligned16(grad_out);
  p.lse_in = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq_accum = dq_accum.data_ptr<float>();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  LLAMA2_DISPATCH_FLOAT_HALF_BF16(q.scalar_type(), op, [&] {
    switch (D) {
      case 16: launch_bwd<scalar_t, 16>(p, op); break;
      case 32: launch_bwd<scalar_t, 32>(p, op); break;
      case 48: launch_bwd<scalar_t, 48>(p, op); break;
      case 64: launch_bwd<scalar_t, 64>(p, op); break;
      default: launch_bwd<scalar_t, 128>(p, op); break;  // D checked above
    }
  });
  return {dq_accum.to(q.scalar_type()), dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(llama2, CUDA, m) { m.impl("attention_bwd", &attention_bwd_cuda); }

}  // namespace cuda
}  // namespace llama2
