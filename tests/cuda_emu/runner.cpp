// Runs the CUDA kernels of csrc/cuda/*_kernels.cuh on the CPU under simt.h, launched the way the
// .cu files launch them (same block sizes, shared-memory layouts and grids; the grid-stride
// kernels get a small grid so that the stride loops turn). tests/test_cuda_emulated.py builds it
// and drives it:
//
//   runner OP dir=DIR dtype=f32|f16|bf16 key=value ...
//
// reads the inputs DIR/<name>.bin (raw little-endian arrays, contiguous) and writes the outputs
// there. The ops and their keys:
//   rms_fwd   N C eps vec grid             x, w             -> out, rstd (f32)
//   rms_bwd   N C vec grid                 g, x, w, rstd    -> dx, dw
//   rope      B T H D P inverse vec table(f32|same) blocks [Hx: x is a view of the first H
//             heads of a (B, T, Hx, D) buffer, as q is of a fused projection]
//                                          x, pos (i64), cos, sin -> out
//   attn_fwd  B Tq Tk H KV D causal scale nseq (0: no cu_seqlens) vec [fused: q, k, v are
//             views of one (B, T, H + 2 KV, D) buffer qkv, as the model's fused projection gives]
//                                          q, k, v or qkv, [cu (i32)] -> out, lse (f32)
//   attn_bwd  same keys                    q, k, v, out, dout, lse, [cu] -> dq (f32, before the
//                                          cast the .cu does), dk, dv
// Every op also takes concurrent=N (default 4): N blocks run interleaved, so that
// ThreadSanitizer sees races between blocks too.
// Exit status 0 on success; simt.h exits 3 on a deadlock, a failed device assertion or a broken
// WMMA rule, ThreadSanitizer (when built with it) 66 on a race.
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention_kernels.cuh"
#include "rms_norm_kernels.cuh"
#include "rope_kernels.cuh"

// The head dims compiled in (each is another set of kernels to compile); -D to narrow.
#ifndef LLAMA2_EMU_HEAD_DIMS
#define LLAMA2_EMU_HEAD_DIMS(X) X(16) X(32) X(48) X(64) X(128)
#endif

// The dtypes compiled in, as (name on the command line, type).
#ifndef LLAMA2_EMU_DTYPES
#define LLAMA2_EMU_DTYPES(X) X(f32, float) X(f16, __half) X(bf16, __nv_bfloat16)
#endif

namespace {

using namespace llama2::cuda;

std::map<std::string, std::string> g_args;
std::string g_dir;

std::string arg(const std::string& key) {
  auto it = g_args.find(key);
  if (it == g_args.end()) simt::fail("runner: missing argument %s=", key.c_str());
  return it->second;
}
long long iarg(const std::string& key) { return std::stoll(arg(key)); }
double farg(const std::string& key) { return std::stod(arg(key)); }

// A 256-byte aligned buffer (16-byte vector loads need 16).
struct Buffer {
  void* data = nullptr;
  size_t bytes = 0;
  explicit Buffer(size_t n) : bytes(n) {
    data = std::aligned_alloc(256, (std::max<size_t>(n, 1) + 255) / 256 * 256);
    std::memset(data, 0xff, (std::max<size_t>(n, 1) + 255) / 256 * 256);  // NaN for floats
  }
  ~Buffer() { std::free(data); }
  Buffer(const Buffer&) = delete;
  template <typename T>
  T* as() const {
    return static_cast<T*>(data);
  }
};

std::unique_ptr<Buffer> read(const std::string& name, size_t bytes) {
  auto b = std::make_unique<Buffer>(bytes);
  const std::string path = g_dir + "/" + name + ".bin";
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) simt::fail("runner: cannot open %s", path.c_str());
  const size_t got = std::fread(b->data, 1, bytes, f);
  std::fclose(f);
  if (got != bytes) simt::fail("runner: %s has %zu bytes, expected %zu", path.c_str(), got, bytes);
  return b;
}

void write(const std::string& name, const Buffer& b) {
  const std::string path = g_dir + "/" + name + ".bin";
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) simt::fail("runner: cannot write %s", path.c_str());
  std::fwrite(b.data, 1, b.bytes, f);
  std::fclose(f);
}

int concurrent() { return g_args.count("concurrent") ? static_cast<int>(iarg("concurrent")) : 4; }

// ---------------------------------------------------------------------------------------------
// RMSNorm (rms_norm.cu)
// ---------------------------------------------------------------------------------------------

template <typename T>
void rms_fwd() {
  simt::ConcurrentBlocks blocks_at_once(concurrent());
  const long long N = iarg("N"), C = iarg("C");
  const bool vec = iarg("vec") && C % vec16<T>() == 0;
  const int grid = static_cast<int>(std::min<long long>(N, iarg("grid")));
  auto x = read("x", N * C * sizeof(T)), w = read("w", C * sizeof(T));
  Buffer out(N * C * sizeof(T)), rstd(N * sizeof(float));
  if (vec) {
    constexpr int VEC = vec16<T>();
    simt::launch(grid, row_threads(C, VEC), 0, rms_norm_fwd_kernel<T, VEC>, x->as<const T>(),
                 w->as<const T>(), out.as<T>(), rstd.as<float>(), (int64_t)N, (int)C,
                 (float)farg("eps"));
  } else {
    simt::launch(grid, row_threads(C, 1), 0, rms_norm_fwd_kernel<T, 1>, x->as<const T>(),
                 w->as<const T>(), out.as<T>(), rstd.as<float>(), (int64_t)N, (int)C,
                 (float)farg("eps"));
  }
  write("out", out);
  write("rstd", rstd);
}

template <typename T>
void rms_bwd() {
  simt::ConcurrentBlocks blocks_at_once(concurrent());
  const long long N = iarg("N"), C = iarg("C");
  const bool vec = iarg("vec") && C % vec16<T>() == 0;
  const int grid = static_cast<int>(std::min<long long>(N, iarg("grid")));
  auto g = read("g", N * C * sizeof(T)), x = read("x", N * C * sizeof(T));
  auto w = read("w", C * sizeof(T)), rstd = read("rstd", N * sizeof(float));
  Buffer dx(N * C * sizeof(T)), dw(C * sizeof(T)), partial(grid * C * sizeof(float));
  const size_t shmem = C * sizeof(float);
  if (vec) {
    constexpr int VEC = vec16<T>();
    simt::launch(grid, row_threads(C, VEC), shmem, rms_norm_bwd_kernel<T, VEC>, g->as<const T>(),
                 x->as<const T>(), w->as<const T>(), rstd->as<const float>(), dx.as<T>(),
                 partial.as<float>(), (int64_t)N, (int)C);
  } else {
    simt::launch(grid, row_threads(C, 1), shmem, rms_norm_bwd_kernel<T, 1>, g->as<const T>(),
                 x->as<const T>(), w->as<const T>(), rstd->as<const float>(), dx.as<T>(),
                 partial.as<float>(), (int64_t)N, (int)C);
  }
  const int threads = 256;
  simt::launch((C + threads - 1) / threads, threads, 0, sum_columns_kernel<T>,
               partial.as<const float>(), dw.as<T>(), grid, (int)C);
  write("dx", dx);
  write("dw", dw);
}

// ---------------------------------------------------------------------------------------------
// RoPE (rope.cu)
// ---------------------------------------------------------------------------------------------

template <typename T, typename CT, int VEC>
void rope_launch(const Buffer& x, const Buffer& pos, const Buffer& cos, const Buffer& sin,
                 Buffer& out, int B, int T_, int H, int Hx, int D, long long P, bool inverse) {
  const int64_t n_items = static_cast<int64_t>(B) * T_ * H * (D / VEC);
  const int threads = 256;
  const int blocks = static_cast<int>(
      std::min<int64_t>((n_items + threads - 1) / threads, iarg("blocks")));
  simt::launch(blocks, threads, 0, rope_kernel<T, CT, VEC>, x.as<const T>(),
               pos.as<const int64_t>(), cos.as<const CT>(), sin.as<const CT>(), out.as<T>(),
               n_items, T_, H, D, (int64_t)P, (int64_t)T_ * Hx * D, (int64_t)Hx * D, (int64_t)D,
               inverse ? -1.0f : 1.0f);
}

template <typename T>
void rope() {
  simt::ConcurrentBlocks blocks_at_once(concurrent());
  const int B = iarg("B"), T_ = iarg("T"), H = iarg("H"), D = iarg("D");
  const long long P = iarg("P");
  const bool inverse = iarg("inverse") != 0;
  const bool table_f32 = arg("table") == "f32";
  const size_t ct = table_f32 ? sizeof(float) : sizeof(T);
  const int Hx = g_args.count("Hx") ? iarg("Hx") : H;  // heads in x's buffer (strides)
  auto x = read("x", (size_t)B * T_ * Hx * D * sizeof(T));
  auto pos = read("pos", (size_t)B * T_ * sizeof(int64_t));
  auto cos = read("cos", P * (D / 2) * ct), sin = read("sin", P * (D / 2) * ct);
  Buffer out((size_t)B * T_ * H * D * sizeof(T));
  constexpr int VEC = vec16<T>();
  const bool vec = iarg("vec") && D % VEC == 0;
  if (vec && table_f32) {
    rope_launch<T, float, VEC>(*x, *pos, *cos, *sin, out, B, T_, H, Hx, D, P, inverse);
  } else if (vec) {
    rope_launch<T, T, VEC>(*x, *pos, *cos, *sin, out, B, T_, H, Hx, D, P, inverse);
  } else if (table_f32) {
    rope_launch<T, float, 2>(*x, *pos, *cos, *sin, out, B, T_, H, Hx, D, P, inverse);
  } else {
    rope_launch<T, T, 2>(*x, *pos, *cos, *sin, out, B, T_, H, Hx, D, P, inverse);
  }
  write("out", out);
}

// ---------------------------------------------------------------------------------------------
// Attention (attention_fwd.cu, attention_bwd.cu)
// ---------------------------------------------------------------------------------------------

struct AttnInputs {
  int B, Tq, Tk, H, KV, D, n_seqs;
  std::unique_ptr<Buffer> q, k, v, qkv, cu;
};

// The parameters make_attn_params fills, for contiguous q/k/v (attention.cuh).
template <typename T>
AttnParams attn_params(AttnInputs& in) {
  in.B = iarg("B"), in.Tq = iarg("Tq"), in.Tk = iarg("Tk"), in.H = iarg("H"), in.KV = iarg("KV");
  in.D = iarg("D"), in.n_seqs = iarg("nseq");
  const int B = in.B, Tq = in.Tq, Tk = in.Tk, H = in.H, KV = in.KV, D = in.D;
  AttnParams p{};
  if (g_args.count("fused") && iarg("fused")) {
    // q, k, v: heads [0, H), [H, H + KV), [H + KV, H + 2 KV) of one (B, T, H + 2 KV, D) buffer.
    if (Tq != Tk) simt::fail("runner: fused q/k/v need Tq == Tk");
    const int W = H + 2 * KV;
    in.qkv = read("qkv", (size_t)B * Tq * W * D * sizeof(T));
    const T* base = in.qkv->as<const T>();
    p.q = base, p.k = base + (size_t)H * D, p.v = base + (size_t)(H + KV) * D;
    p.q_sb = p.k_sb = p.v_sb = (int64_t)Tq * W * D;
    p.q_st = p.k_st = p.v_st = (int64_t)W * D;
    p.q_sh = p.k_sh = p.v_sh = D;
  } else {
    in.q = read("q", (size_t)B * Tq * H * D * sizeof(T));
    in.k = read("k", (size_t)B * Tk * KV * D * sizeof(T));
    in.v = read("v", (size_t)B * Tk * KV * D * sizeof(T));
    p.q = in.q->data, p.k = in.k->data, p.v = in.v->data;
    p.q_sb = (int64_t)Tq * H * D, p.q_st = (int64_t)H * D, p.q_sh = D;
    p.k_sb = (int64_t)Tk * KV * D, p.k_st = (int64_t)KV * D, p.k_sh = D;
    p.v_sb = p.k_sb, p.v_st = p.k_st, p.v_sh = p.k_sh;
  }
  // rows_aligned16 of attention.cuh: every row start 16-byte aligned (and asked for).
  auto aligned = [](const void* ptr, int64_t sb, int64_t st, int64_t sh) {
    const int64_t v = 16 / sizeof(T);
    return aligned16(ptr) && sb % v == 0 && st % v == 0 && sh % v == 0;
  };
  const bool vec = iarg("vec") != 0;
  p.q_vec = vec && aligned(p.q, p.q_sb, p.q_st, p.q_sh);
  p.k_vec = vec && aligned(p.k, p.k_sb, p.k_st, p.k_sh);
  p.v_vec = vec && aligned(p.v, p.v_sb, p.v_st, p.v_sh);
  p.B = B, p.Tq = Tq, p.Tk = Tk, p.H = H, p.KV = KV;
  p.scale = static_cast<float>(farg("scale"));
  p.causal = iarg("causal") != 0;
  p.cu_seqlens = nullptr;
  p.n_seqs = 0;
  if (in.n_seqs > 0) {
    in.cu = read("cu", (in.n_seqs + 1) * sizeof(int));
    p.cu_seqlens = in.cu->as<const int>();
    p.n_seqs = in.n_seqs;
  }
  return p;
}

template <typename T, int D>
void attn_fwd_d(AttnParams& p, AttnInputs& in) {
  constexpr int WARPS = fwd_warps<T>();
  using L = FwdLayout<T, D, WARPS>;
  Buffer out((size_t)in.B * in.Tq * in.H * D * sizeof(T));
  Buffer lse((size_t)in.B * in.H * in.Tq * sizeof(float));
  p.out = out.data;
  p.o_sb = (int64_t)in.Tq * in.H * D, p.o_st = (int64_t)in.H * D, p.o_sh = D;
  p.lse = lse.as<float>();
  const dim3 grid((p.Tq + L::BM - 1) / L::BM, p.H, p.B);
  simt::launch(grid, L::NT, L::bytes, attention_fwd_kernel<T, D, WARPS>, p);
  write("out", out);
  write("lse", lse);
}

template <typename T, int D>
void attn_bwd_d(AttnParams& p, AttnInputs& in) {
  constexpr int WARPS = kBwdWarps;
  using L = BwdLayout<T, D, WARPS>;
  const size_t nq = (size_t)in.B * in.Tq * in.H * D, nk = (size_t)in.B * in.Tk * in.KV * D;
  auto out = read("out", nq * sizeof(T)), dout = read("dout", nq * sizeof(T));
  auto lse = read("lse", (size_t)in.B * in.H * in.Tq * sizeof(float));
  Buffer delta((size_t)in.B * in.H * in.Tq * sizeof(float)), dq(nq * sizeof(float));
  Buffer dk(nk * sizeof(T)), dv(nk * sizeof(T));
  std::memset(dq.data, 0, dq.bytes);  // at::zeros in the .cu
  p.out_in = out->data;
  p.o_sb = (int64_t)in.Tq * in.H * D, p.o_st = (int64_t)in.H * D, p.o_sh = D;
  p.dout = dout->data;
  p.do_sb = p.o_sb, p.do_st = p.o_st, p.do_sh = p.o_sh;
  p.do_vec = iarg("vec") != 0 && (D * sizeof(T)) % 16 == 0;  // dout is contiguous
  p.lse_in = lse->as<const float>();
  p.delta = delta.as<float>();
  p.dq_accum = dq.as<float>();
  p.dk = dk.data;
  p.dv = dv.data;
  const int64_t n_rows = (int64_t)p.B * p.Tq * p.H;
  const int threads = 256;
  simt::launch((n_rows * 32 + threads - 1) / threads, threads, 0, attention_delta_kernel<T>, p, D);
  const dim3 grid((p.Tk + L::BN - 1) / L::BN, p.KV, p.B);
  simt::launch(grid, L::NT, L::bytes, attention_bwd_kernel<T, D, WARPS>, p);
  write("dq", dq);
  write("dk", dk);
  write("dv", dv);
}

template <typename T, bool BWD>
void attention() {
  simt::ConcurrentBlocks blocks_at_once(concurrent());
  AttnInputs in;
  AttnParams p = attn_params<T>(in);
  switch (in.D) {
#define LLAMA2_EMU_CASE(DIM)          \
  case DIM:                           \
    if constexpr (BWD) {              \
      attn_bwd_d<T, DIM>(p, in);      \
    } else {                          \
      attn_fwd_d<T, DIM>(p, in);      \
    }                                 \
    break;
    LLAMA2_EMU_HEAD_DIMS(LLAMA2_EMU_CASE)
#undef LLAMA2_EMU_CASE
    default:
      simt::fail("runner: head dim %d is not compiled into this runner", in.D);
  }
}

template <typename T>
void run(const std::string& op) {
  if (op == "rms_fwd") return rms_fwd<T>();
  if (op == "rms_bwd") return rms_bwd<T>();
  if (op == "rope") return rope<T>();
  if (op == "attn_fwd") return attention<T, false>();
  if (op == "attn_bwd") return attention<T, true>();
  simt::fail("runner: unknown op %s", op.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) simt::fail("usage: runner OP dir=DIR dtype=f32|f16|bf16 key=value ...");
  const std::string op = argv[1];
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    const size_t eq = a.find('=');
    if (eq == std::string::npos) simt::fail("runner: argument %s is not key=value", argv[i]);
    g_args[a.substr(0, eq)] = a.substr(eq + 1);
  }
  g_dir = arg("dir");
  const std::string dtype = arg("dtype");
#define LLAMA2_EMU_DTYPE(NAME, TYPE) \
  if (dtype == #NAME) {              \
    run<TYPE>(op);                   \
    return 0;                        \
  }
  LLAMA2_EMU_DTYPES(LLAMA2_EMU_DTYPE)
#undef LLAMA2_EMU_DTYPE
  simt::fail("runner: dtype %s is not compiled into this runner", dtype.c_str());
}
