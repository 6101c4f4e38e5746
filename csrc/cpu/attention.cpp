// Flash-style grouped-query attention on CPU, forward and backward.
//
//   out_i = sum_j softmax_j(scale * q_i . k_j) v_j      over the keys j that query i may see
//   lse_i = log sum_j exp(scale * q_i . k_j)            (natural log, saved for the backward)
//   causal is bottom-right aligned: query i of Tq sees keys j <= i + (Tk - Tq).
//   With cu_seqlens (B == 1, Tq == Tk) the tokens are packed sequences; attention never crosses a
//   sequence boundary (causal within each sequence, or full within each when causal=False).
//
// Shapes: q (B, Tq, H, D), k/v (B, Tk, KV, D), H = G * KV; any strides with the last one 1 (so KV
// cache slices are read in place); out (B, Tq, H, D) contiguous; lse (B, H, Tq), float32 for
// float32 and bfloat16 inputs and float64 for float64 ones.
// Dtypes: T is the storage type (float32, float64 or bfloat16), A the arithmetic type (float32, or
// float64 for float64). bfloat16 Q/dO rows are widened as they are packed and K/V tiles as they are
// read (once per tile), so every product, the softmax and all sums run in float32; out, dk and dv
// are rounded to bfloat16 once, when stored, and dq is summed in float32 and rounded at the end.
//
// How it is computed (FlashAttention-2, Dao 2023, arranged for a CPU):
// - A work item is (sequence, kv head, tile of BQ query tokens). The G query heads that share the
//   kv head are packed together as G*BQ rows, so each K/V tile is read once per group and the
//   products are large enough for BLAS. Query heads never read a repeated copy of K/V.
// - Forward: for each K/V tile of BK keys, S = Q K^T (rows x BK) in a small buffer, online softmax
//   (running max m, running sum l, rescale the accumulator), acc += P V. The T x T score matrix is
//   never formed: extra memory is O(threads * rows * (BK + D)).
// - Backward: one work item per (sequence, kv head) owns dK/dV of its keys and dQ of its rows, so no
//   atomics (with fewer such pairs than threads, the keys are split and dQ summed from partials). For each K/V tile, and each query tile that sees it, P is recomputed from the saved
//   lse, then dV += P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dQ += dS K, dK += dS^T Q.
// Memory traffic: forward reads Q once, K/V once per query tile (from cache when they fit), writes
// O once; backward reads Q/dO once per K/V tile of the item (they stay in L2 for moderate T).
#include <torch/library.h>

#include <utility>
#include <vector>

#include "../common.h"

namespace llama2 {
namespace {

// Query tokens per tile (times G heads = rows of a tile) and keys per K/V tile.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 128;

// One sequence: batch row b, queries [q0, q0 + q_len), keys [k0, k0 + k_len) of that batch row.
struct Segment {
  int64_t b, q0, k0, q_len, k_len;
};

// A (B, T, heads, D) tensor with unit stride in D, addressed by (b, t, head).
template <typename T>
struct View {
  T* p;
  int64_t sb, st, sh;
  T* row(int64_t b, int64_t t, int64_t h) const { return p + b * sb + t * st + h * sh; }
};

template <typename T>
View<T> view_of(const at::Tensor& t) {
  return {t.data_ptr<std::remove_const_t<T>>(), t.stride(0), t.stride(1), t.stride(2)};
}

// Keys of a sequence that query token t may see: [0, limit(t)). Non-causal sees them all.
inline int64_t key_limit(bool causal, int64_t t, const Segment& s) {
  if (!causal) return s.k_len;
  return std::min(s.k_len, std::max<int64_t>(0, t + (s.k_len - s.q_len) + 1));
}

// n rows (tokens t.., one head) of a K or V tile as A, with their row stride: read in place when T
// is A, else widened into buf (n x D, row stride D), so that BLAS works in A.
template <typename T, typename A>
std::pair<const A*, int64_t> tile_as(View<const T> x, int64_t b, int64_t t, int64_t h, int64_t n,
                                     int64_t D, std::vector<A>& buf) {
  if constexpr (std::is_same_v<T, A>) {
    return {x.row(b, t, h), x.st};
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const T* src = x.row(b, t + i, h);
      A* dst = buf.data() + i * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) dst[d] = widen(src[d]);
    }
    return {buf.data(), D};
  }
}

template <typename T, typename A>
void attention_fwd_kernel(View<const T> q, View<const T> k, View<const T> v, View<T> out, A* lse,
                          const std::vector<Segment>& segs, int64_t H, int64_t KV, int64_t D,
                          int64_t Tq, A scale, bool causal) {
  const int64_t G = H / KV;
  // Work items (segment, kv head, query tile), the most expensive first for load balance.
  struct Item {
    int64_t seg, kvh, t0, cost;
  };
  std::vector<Item> items;
  for (int64_t si = 0; si < static_cast<int64_t>(segs.size()); ++si) {
    const Segment& s = segs[si];
    for (int64_t t0 = 0; t0 < s.q_len; t0 += kBlockQ) {
      const int64_t t_last = std::min(s.q_len, t0 + kBlockQ) - 1;
      const int64_t cost = key_limit(causal, t_last, s) + 1;
      for (int64_t kvh = 0; kvh < KV; ++kvh) items.push_back({si, kvh, t0, cost});
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.cost > b.cost; });
  double flops = 0;  // two products of (rows x keys x D)
  for (const Item& it : items) flops += 4.0 * double(it.cost) * double(kBlockQ * G * D);

  parallel_items(static_cast<int64_t>(items.size()), flops, [&](int64_t idx) {
    const Item& it = items[idx];
    const Segment& s = segs[it.seg];
    const int64_t nt = std::min(kBlockQ, s.q_len - it.t0);  // query tokens in this tile
    const int64_t M = nt * G;                               // rows: (token, head in group)
    // Per-item buffers: packed scaled Q (M, D), scores (M, BK), accumulator (M, D), m and l (M),
    // all in A; K/V tiles widened to A (bfloat16 inputs only).
    std::vector<A> qp(M * D), sc(M * kBlockK), acc(M * D, A(0));
    std::vector<A> run_max(M, -std::numeric_limits<A>::infinity()), run_sum(M, A(0));
    std::vector<A> k_buf(std::is_same_v<T, A> ? 0 : kBlockK * D), v_buf(k_buf.size());

    // Pack the G heads of each token as consecutive rows, pre-multiplied by the softmax scale.
    for (int64_t t = 0; t < nt; ++t) {
      for (int64_t g = 0; g < G; ++g) {
        const T* src = q.row(s.b, s.q0 + it.t0 + t, it.kvh * G + g);
        A* dst = qp.data() + (t * G + g) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) dst[d] = widen(src[d]) * scale;
      }
    }

    const int64_t k_end = key_limit(causal, it.t0 + nt - 1, s);
    for (int64_t j0 = 0; j0 < k_end; j0 += kBlockK) {
      const int64_t nk = std::min(kBlockK, k_end - j0);
      const auto [kp, ldk] = tile_as<T, A>(k, s.b, s.k0 + j0, it.kvh, nk, D, k_buf);
      const auto [vp, ldv] = tile_as<T, A>(v, s.b, s.k0 + j0, it.kvh, nk, D, v_buf);
      // (M, nk) scores of this tile
      gemm_rm<A>(false, true, M, nk, D, A(1), qp.data(), D, kp, ldk, A(0), sc.data(), kBlockK);

      for (int64_t t = 0; t < nt; ++t) {
        // Keys past the causal limit of token t get no weight.
        const int64_t n_ok = std::min(nk, std::max<int64_t>(0, key_limit(causal, it.t0 + t, s) - j0));
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = t * G + g;
          A* sr = sc.data() + r * kBlockK;
          // Only the first n_ok scores are visible; the rest get probability 0.
          const A mx = row_max(sr, n_ok);
          const A m_new = std::max(run_max[r], mx);
          std::fill(sr + n_ok, sr + nk, A(0));
          if (m_new == -std::numeric_limits<A>::infinity()) {
            // Nothing visible yet: zero weights, keep the running state.
            std::fill(sr, sr + n_ok, A(0));
            continue;
          }
          // Online softmax: rescale what was summed so far to the new running max.
          const A alpha = exp_of<A>(run_max[r] - m_new);
          const A sum = exp_shift_sum(sr, n_ok, m_new);
          run_sum[r] = run_sum[r] * alpha + sum;
          run_max[r] = m_new;
          A* ar = acc.data() + r * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ar[d] *= alpha;
        }
      }
      // acc (M, D) += P (M, nk) @ V (nk, D)
      gemm_rm<A>(false, false, M, D, nk, A(1), sc.data(), kBlockK, vp, ldv, A(1), acc.data(), D);
    }

    // Normalize and write out (B, Tq, H, D) and lse (B, H, Tq).
    for (int64_t t = 0; t < nt; ++t) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t r = t * G + g;
        const int64_t h = it.kvh * G + g, tq = s.q0 + it.t0 + t;
        const A l = run_sum[r];
        const A inv = l > A(0) ? A(1) / l : A(0);
        T* dst = out.row(s.b, tq, h);
        const A* ar = acc.data() + r * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) dst[d] = narrow<T>(ar[d] * inv);
        lse[(s.b * H + h) * Tq + tq] = l > A(0) ? run_max[r] + std::log(l)
                                                : -std::numeric_limits<A>::infinity();
      }
    }
  });
}

// dq is written in A (the caller rounds it to T afterwards): split items add partials into it.
template <typename T, typename A>
void attention_bwd_kernel(View<const T> dout, View<const T> q, View<const T> k, View<const T> v,
                          View<const T> out, const A* lse, View<A> dq, View<T> dk, View<T> dv,
                          const std::vector<Segment>& segs, int64_t H, int64_t KV, int64_t D,
                          int64_t Tq, A scale, bool causal) {
  const int64_t G = H / KV;
  // Work items (segment, kv head, chunk of keys): each owns dK/dV of its keys. dQ of the rows of a
  // (segment, kv head) is owned by its item when the keys are not split; with fewer pairs than
  // threads the keys are split into chunks, each summing dQ into a private buffer, added up after.
  const int64_t n_pairs = static_cast<int64_t>(segs.size()) * KV;
  const int64_t want_chunks = std::max<int64_t>(1, (2 * at::get_num_threads() + n_pairs - 1) / n_pairs);
  struct Item {
    int64_t seg, kvh, j_begin, j_end, n_chunks, cost;
  };
  std::vector<Item> items;
  for (int64_t si = 0; si < static_cast<int64_t>(segs.size()); ++si) {
    const Segment& s = segs[si];
    const int64_t n_tiles = (s.k_len + kBlockK - 1) / kBlockK;
    const int64_t n_chunks = std::max<int64_t>(1, std::min(want_chunks, n_tiles));
    const int64_t tiles_per_chunk = (n_tiles + n_chunks - 1) / std::max<int64_t>(1, n_chunks);
    for (int64_t kvh = 0; kvh < KV; ++kvh) {
      for (int64_t c = 0; c < n_chunks; ++c) {
        const int64_t jb = c * tiles_per_chunk * kBlockK;
        const int64_t je = std::min(s.k_len, (c + 1) * tiles_per_chunk * kBlockK);
        if (jb >= je) continue;
        // Query rows that see these keys (causal: the later ones) times the keys.
        const int64_t first_t = causal ? std::max<int64_t>(0, jb - (s.k_len - s.q_len)) : 0;
        items.push_back({si, kvh, jb, je, n_chunks, (je - jb) * std::max<int64_t>(1, s.q_len - first_t)});
      }
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.cost > b.cost; });
  // Private dQ (rows, D) of the items whose keys were split, indexed like items.
  std::vector<std::vector<A>> dq_partial(items.size());
  double flops = 0;  // five products of (rows x keys x D)
  for (const Item& it : items) flops += 10.0 * double(it.cost) * double(G * D);

  parallel_items(static_cast<int64_t>(items.size()), flops, [&](int64_t idx) {
    const Item& it = items[idx];
    const Segment& s = segs[it.seg];
    const int64_t M = s.q_len * G;
    // Packed rows (token, head in group) of Q, dO, and their lse and delta = rowsum(dO * O).
    std::vector<A> qp(M * D), dop(M * D), dqa(M * D, A(0)), lp(M), delta(M);
    std::vector<A> p_buf(kBlockQ * G * kBlockK), ds_buf(kBlockQ * G * kBlockK);
    std::vector<A> dk_t(kBlockK * D), dv_t(kBlockK * D);
    std::vector<A> k_buf(std::is_same_v<T, A> ? 0 : kBlockK * D), v_buf(k_buf.size());

    for (int64_t t = 0; t < s.q_len; ++t) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t r = t * G + g, h = it.kvh * G + g, tq = s.q0 + t;
        const T* qs = q.row(s.b, tq, h);
        const T* gs = dout.row(s.b, tq, h);
        const T* os = out.row(s.b, tq, h);
        A* qd = qp.data() + r * D;
        A* gd = dop.data() + r * D;
        A dsum = 0;
#pragma omp simd reduction(+ : dsum)
        for (int64_t d = 0; d < D; ++d) {
          qd[d] = widen(qs[d]);
          gd[d] = widen(gs[d]);
          dsum += widen(gs[d]) * widen(os[d]);
        }
        delta[r] = dsum;
        lp[r] = lse[(s.b * H + h) * Tq + tq];
      }
    }

    for (int64_t j0 = it.j_begin; j0 < it.j_end; j0 += kBlockK) {
      const int64_t nk = std::min(kBlockK, it.j_end - j0);
      const auto [kp, ldk] = tile_as<T, A>(k, s.b, s.k0 + j0, it.kvh, nk, D, k_buf);
      const auto [vp, ldv] = tile_as<T, A>(v, s.b, s.k0 + j0, it.kvh, nk, D, v_buf);
      std::fill(dk_t.begin(), dk_t.end(), A(0));
      std::fill(dv_t.begin(), dv_t.end(), A(0));
      // First query token that sees key j0 (causal); earlier ones skip this tile.
      int64_t t_start = 0;
      if (causal) t_start = std::max<int64_t>(0, j0 - (s.k_len - s.q_len));
      for (int64_t t0 = t_start; t0 < s.q_len; t0 += kBlockQ) {
        const int64_t nt = std::min(kBlockQ, s.q_len - t0);
        const int64_t Mq = nt * G, r0 = t0 * G;
        // P (Mq, nk) = exp(scale * Q K^T - lse), recomputed
        gemm_rm<A>(false, true, Mq, nk, D, scale, qp.data() + r0 * D, D, kp, ldk, A(0),
                   p_buf.data(), kBlockK);
        // dP (Mq, nk) = dO V^T
        gemm_rm<A>(false, true, Mq, nk, D, A(1), dop.data() + r0 * D, D, vp, ldv, A(0),
                   ds_buf.data(), kBlockK);
        for (int64_t t = 0; t < nt; ++t) {
          const int64_t n_ok = std::min(nk, std::max<int64_t>(0, key_limit(causal, t0 + t, s) - j0));
          for (int64_t g = 0; g < G; ++g) {
            const int64_t r = t * G + g;
            A* pr = p_buf.data() + r * kBlockK;
            A* dsr = ds_buf.data() + r * kBlockK;
            const A l = lp[r0 + r], dl = delta[r0 + r];
            exp_shift_sum(pr, n_ok, l);
            std::fill(pr + n_ok, pr + nk, A(0));
#pragma omp simd
            for (int64_t c = 0; c < nk; ++c) dsr[c] = pr[c] * (dsr[c] - dl);  // dS = P * (dP - delta)
          }
        }
        // dV (nk, D) += P^T dO;  dK (nk, D) += scale * dS^T Q;  dQ (Mq, D) += scale * dS K
        gemm_rm<A>(true, false, nk, D, Mq, A(1), p_buf.data(), kBlockK, dop.data() + r0 * D, D,
                   A(1), dv_t.data(), D);
        gemm_rm<A>(true, false, nk, D, Mq, scale, ds_buf.data(), kBlockK, qp.data() + r0 * D, D,
                   A(1), dk_t.data(), D);
        gemm_rm<A>(false, false, Mq, D, nk, scale, ds_buf.data(), kBlockK, kp, ldk, A(1),
                   dqa.data() + r0 * D, D);
      }
      for (int64_t c = 0; c < nk; ++c) {
        const A* sk = dk_t.data() + c * D;
        const A* sv = dv_t.data() + c * D;
        T* dkr = dk.row(s.b, s.k0 + j0 + c, it.kvh);
        T* dvr = dv.row(s.b, s.k0 + j0 + c, it.kvh);
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          dkr[d] = narrow<T>(sk[d]);
          dvr[d] = narrow<T>(sv[d]);
        }
      }
    }
    if (it.n_chunks > 1) {
      dq_partial[idx] = std::move(dqa);
      return;
    }
    for (int64_t t = 0; t < s.q_len; ++t) {
      for (int64_t g = 0; g < G; ++g) {
        std::copy_n(dqa.data() + (t * G + g) * D, D, dq.row(s.b, s.q0 + t, it.kvh * G + g));
      }
    }
  });

  // Add up the private dQ of split items into dq (zero-initialized by the caller).
  for (size_t idx = 0; idx < items.size(); ++idx) {
    if (dq_partial[idx].empty()) continue;
    const Item& it = items[idx];
    const Segment& s = segs[it.seg];
    at::parallel_for(0, s.q_len, 64, [&](int64_t tb, int64_t te) {
      for (int64_t t = tb; t < te; ++t) {
        for (int64_t g = 0; g < G; ++g) {
          const A* src = dq_partial[idx].data() + (t * G + g) * D;
          A* dst = dq.row(s.b, s.q0 + t, it.kvh * G + g);
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) dst[d] += src[d];
        }
      }
    });
  }
}

// Checks shared by forward and backward; returns the sequences to attend within.
std::vector<Segment> check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& v,
                                            const std::optional<at::Tensor>& cu_seqlens,
                                            double scale, bool causal) {
  check_cpu(q, op, "q");
  check_cpu(k, op, "k");
  check_cpu(v, op, "v");
  check_float(q, op, "q");
  check_same_dtype(q, k, op, "q", "k");
  check_same_dtype(q, v, op, "q", "v");
  TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D (B, Tq, H, D), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4, op, ": k must be 4-D (B, Tk, KV, D), got shape ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v has shape ", v.sizes(), " but k has ", k.sizes(),
              "; they must match");
  const int64_t B = q.size(0), Tq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Tk = k.size(1), KV = k.size(2);
  TORCH_CHECK(k.size(0) == B, op, ": q has batch ", B, " but k/v have batch ", k.size(0));
  TORCH_CHECK(k.size(3) == D, op, ": q has head_dim ", D, " but k/v have head_dim ", k.size(3));
  TORCH_CHECK(D >= 1 && D <= 256, op, ": head_dim ", D,
              " is out of range; the CPU kernel supports 1 <= head_dim <= 256");
  TORCH_CHECK(KV >= 1 && H % KV == 0, op, ": n_heads (", H, ") must be a multiple of n_kv_heads (",
              KV, ")");
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be a finite number, got ", scale);

  std::vector<Segment> segs;
  if (cu_seqlens.has_value()) {
    const at::Tensor& cu = *cu_seqlens;
    check_cpu(cu, op, "cu_seqlens");
    TORCH_CHECK(cu.scalar_type() == at::kInt, op, ": cu_seqlens must be int32, got ",
                cu.scalar_type());
    TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 2, op,
                ": cu_seqlens must be 1-D (S+1,) with S >= 1 sequences, got shape ", cu.sizes());
    TORCH_CHECK(B == 1, op, ": packed sequences (cu_seqlens) need batch 1, got B=", B,
                "; flatten the batch into one row of tokens");
    TORCH_CHECK(Tq == Tk, op, ": packed sequences (cu_seqlens) need Tq == Tk, got Tq=", Tq,
                " and Tk=", Tk);
    const at::Tensor cc = cu.contiguous();
    const int32_t* c = cc.data_ptr<int32_t>();
    const int64_t S = cu.size(0) - 1;
    TORCH_CHECK(c[0] == 0, op, ": cu_seqlens must start at 0, got ", c[0]);
    TORCH_CHECK(c[S] == Tq, op, ": cu_seqlens ends at ", c[S], " but there are T=", Tq,
                " tokens; the last entry must equal T");
    for (int64_t i = 0; i < S; ++i) {
      TORCH_CHECK(c[i + 1] >= c[i], op, ": cu_seqlens must be non-decreasing, but entry ", i + 1,
                  " (", c[i + 1], ") < entry ", i, " (", c[i], ")");
      if (c[i + 1] > c[i]) segs.push_back({0, c[i], c[i], c[i + 1] - c[i], c[i + 1] - c[i]});
    }
  } else {
    TORCH_CHECK(!causal || Tq <= Tk, op, ": causal attention needs Tq <= Tk (queries are the last Tq",
                " of the Tk positions), got Tq=", Tq, " and Tk=", Tk);
    for (int64_t b = 0; b < B; ++b) segs.push_back({b, 0, 0, Tq, Tk});
  }
  return segs;
}

// Unit stride in the last dimension, and rows at least D apart (BLAS's leading dimension), is all
// the kernels need; copy only what lacks it (e.g. an expanded K with time stride 0).
at::Tensor unit_last_stride(const at::Tensor& t) {
  return (t.stride(-1) == 1 && t.stride(1) >= t.size(-1)) ? t : t.contiguous();
}

// q (B, Tq, H, D), k/v (B, Tk, KV, D), cu_seqlens (S+1) int32 or None -> out (B, Tq, H, D), lse (B, H, Tq)
std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in,
                                                     const std::optional<at::Tensor>& cu_seqlens,
                                                     double scale, bool causal) {
  const char* op = "llama2::attention_fwd";
  const auto segs = check_attention_inputs(op, q_in, k_in, v_in, cu_seqlens, scale, causal);
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const int64_t B = q.size(0), Tq = q.size(1), H = q.size(2), D = q.size(3), KV = k.size(2);
  at::Tensor out = at::empty({B, Tq, H, D}, q.options());
  at::Tensor lse = at::empty({B, H, Tq}, q.options().dtype(stat_dtype(q.scalar_type())));
  if (out.numel() == 0) return {out, lse};
  if (k.size(1) == 0) {
    // No keys at all: nothing to attend to.
    out.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "attention_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    attention_fwd_kernel<scalar_t, acc_t>(view_of<const scalar_t>(q), view_of<const scalar_t>(k),
                                          view_of<const scalar_t>(v), view_of<scalar_t>(out),
                                          lse.data_ptr<acc_t>(), segs, H, KV, D, Tq,
                                          static_cast<acc_t>(scale), causal);
  });
  return {out, lse};
}

// grad_out/out (B, Tq, H, D), q, k, v, lse (B, H, Tq) -> dq (B, Tq, H, D), dk/dv (B, Tk, KV, D)
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const std::optional<at::Tensor>& cu_seqlens, double scale, bool causal) {
  const char* op = "llama2::attention_bwd";
  const auto segs = check_attention_inputs(op, q_in, k_in, v_in, cu_seqlens, scale, causal);
  check_cpu(grad_out_in, op, "grad_out");
  check_cpu(out_in, op, "out");
  check_cpu(lse_in, op, "lse");
  check_same_dtype(q_in, grad_out_in, op, "q", "grad_out");
  check_same_dtype(q_in, out_in, op, "q", "out");
  TORCH_CHECK(lse_in.scalar_type() == stat_dtype(q_in.scalar_type()), op, ": lse has dtype ",
              lse_in.scalar_type(), " but q is ", q_in.scalar_type(), ", so lse must be ",
              stat_dtype(q_in.scalar_type()), "; pass the lse returned by attention_fwd for this q");
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(), op,
              ": grad_out ", grad_out_in.sizes(), " and out ", out_in.sizes(),
              " must have the shape of q ", q_in.sizes());
  const int64_t B = q_in.size(0), Tq = q_in.size(1), H = q_in.size(2), D = q_in.size(3);
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == B && lse_in.size(1) == H &&
                  lse_in.size(2) == Tq,
              op, ": lse must have shape (B, H, Tq) = (", B, ", ", H, ", ", Tq, "), got ",
              lse_in.sizes(), "; pass the lse returned by attention_fwd");
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const at::Tensor g = unit_last_stride(grad_out_in), o = unit_last_stride(out_in);
  const at::Tensor lse = lse_in.contiguous();
  const int64_t KV = k.size(2);
  // dq is summed in the arithmetic dtype (partials of split items add into it), rounded at the end.
  at::Tensor dq = at::zeros({B, Tq, H, D}, q.options().dtype(stat_dtype(q.scalar_type())));
  at::Tensor dk = at::zeros({B, k.size(1), KV, D}, q.options());
  at::Tensor dv = at::zeros({B, k.size(1), KV, D}, q.options());
  if (q.numel() > 0 && k.size(1) > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "attention_bwd_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      attention_bwd_kernel<scalar_t, acc_t>(
          view_of<const scalar_t>(g), view_of<const scalar_t>(q), view_of<const scalar_t>(k),
          view_of<const scalar_t>(v), view_of<const scalar_t>(o), lse.data_ptr<acc_t>(),
          view_of<acc_t>(dq), view_of<scalar_t>(dk), view_of<scalar_t>(dv), segs, H, KV, D, Tq,
          static_cast<acc_t>(scale), causal);
    });
  }
  return {dq.to(q.scalar_type()), dk, dv};
}

}  // namespace
}  // namespace llama2

TORCH_LIBRARY_IMPL(llama2, CPU, m) {
  m.impl("attention_fwd", &llama2::attention_fwd_cpu);
  m.impl("attention_bwd", &llama2::attention_bwd_cpu);
}
