// Runs the CUDA kernels of csrc/cuda/*_kernels.cuh on the CPU under simt.h, launched by the same
// host functions as the .cu files (the *_launch functions and attn_params of the kernel headers:
// which kernel, grid, block, shared memory, parameters), with simt::launch in place of <<<>>>.
// Only the device's SM count is not asked: the grid caps are small keys here, so that the
// grid-stride loops turn. tests/test_cuda_emulated.py builds it and drives it:
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
// vec=0 places the data inputs one element past a 16-byte boundary, so that the host logic picks
// the scalar (unaligned) paths, as it would for such tensors on a GPU. grid / blocks: the most
// blocks a launch may use (the .cu files: a multiple of the SM count). Every op also takes
// concurrent=N (default 4): N blocks run interleaved, so that ThreadSanitizer sees races between
// blocks too.
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

// A buffer whose data start `offset` bytes past a 256-byte boundary (16-byte vector loads need
// 16-byte alignment; the host logic checks it).
struct Buffer {
  void* base = nullptr;
  void* data = nullptr;
  size_t bytes = 0;
  explicit Buffer(size_t n, size_t offset = 0) : bytes(n) {
    const size_t alloc = (std::max<size_t>(n + offset, 1) + 255) / 256 * 256;
    base = std::aligned_alloc(256, alloc);
    std::memset(base, 0xff, alloc);  // NaN for floats
    data = static_cast<unsigned char*>(base) + offset;
  }
  ~Buffer() { std::free(base); }
  Buffer(const Buffer&) = delete;
  template <typename T>
  T* as() const {
    return static_cast<T*>(data);
  }
};

std::unique_ptr<Buffer> read(const std::string& name, size_t bytes, size_t offset = 0) {
  auto b = std::make_unique<Buffer>(bytes, offset);
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

// The launch callback of the *_launch functions (device.cuh): simt::launch in place of <<<>>>.
const auto emulate = [](auto kernel, const LaunchConfig& c, auto... args) {
  simt::launch(c.grid, c.block, c.shared_bytes, kernel, args...);
};

int concurrent() { return g_args.count("concurrent") ? static_cast<int>(iarg("concurrent")) : 4; }

// Data inputs start one element (element_size bytes) past a 16-byte boundary when vec=0.
size_t offset(size_t element_size) { return iarg("vec") ? 0 : element_size; }

// ---------------------------------------------------------------------------------------------
// RMSNorm (rms_norm.cu)
// ---------------------------------------------------------------------------------------------

template <typename T>
void rms_fwd() {
  simt::ConcurrentBlocks blocks_at_once(concurrent());
  const long long N = iarg("N"), C = iarg("C");
  const size_t off = offset(sizeof(T));
  auto x = read("x", N * C * sizeof(T), off), w = read("w", C * sizeof(T), off);
  Buffer out(N * C * sizeof(T), off), rstd(N * sizeof(float));
  rms_norm_fwd_launch(x->as<const T>(), w->as<const T>(), out.as<T>(), rstd.as<float>(),
                      (int64_t)N, (int)C, (float)farg("eps"), iarg("grid"), emulate);
  write("out", out);
  write("rstd", rstd);
}

template <typename T>
void rms_bwd() {
  simt::ConcurrentBlocks blocks_at_once(concurrent());
  const long long N = iarg("N"), C = iarg("C");
  const size_t off = offset(sizeof(T));
  auto g = read("g", N * C * sizeof(T), off), x = read("x", N * C * sizeof(T), off);
  auto w = read("w", C * sizeof(T), off), rstd = read("rstd", N * sizeof(float));
  Buffer dx(N * C * sizeof(T), off), dw(C * sizeof(T));
  Buffer partial(rms_norm_bwd_blocks(N, iarg("grid")) * C * sizeof(float));
  rms_norm_bwd_launch(g->as<const T>(), x->as<const T>(), w->as<const T>(),
                      rstd->as<const float>(), dx.as<T>(), dw.as<T>(), partial.as<float>(),
                      (int64_t)N, (int)C, iarg("grid"), emulate);
  write("dx", dx);
  write("dw", dw);
}

// ---------------------------------------------------------------------------------------------
// RoPE (rope.cu)
// ---------------------------------------------------------------------------------------------

template <typename T>
void rope() {
  simt::ConcurrentBlocks blocks_at_once(concurrent());
  const int B = iarg("B"), T_ = iarg("T"), H = iarg("H"), D = iarg("D");
  const long long P = iarg("P");
  const bool inverse = iarg("inverse") != 0;
  const bool table_f32 = arg("table") == "f32";
  const size_t ct = table_f32 ? sizeof(float) : sizeof(T);
  const int Hx = g_args.count("Hx") ? iarg("Hx") : H;  // heads in x's buffer (strides)
  auto x = read("x", (size_t)B * T_ * Hx * D * sizeof(T), offset(sizeof(T)));
  auto pos = read("pos", (size_t)B * T_ * sizeof(int64_t));
  auto cos = read("cos", P * (D / 2) * ct), sin = read("sin", P * (D / 2) * ct);
  Buffer out((size_t)B * T_ * H * D * sizeof(T));
  const int64_t sb = (int64_t)T_ * Hx * D, st = (int64_t)Hx * D, sh = D;
  if (table_f32) {
    rope_launch(x->as<const T>(), sb, st, sh, pos->as<const int64_t>(), cos->as<const float>(),
                sin->as<const float>(), out.as<T>(), B, T_, H, D, (int64_t)P, inverse,
                iarg("blocks"), emulate);
  } else {
    rope_launch(x->as<const T>(), sb, st, sh, pos->as<const int64_t>(), cos->as<const T>(),
                sin->as<const T>(), out.as<T>(), B, T_, H, D, (int64_t)P, inverse,
                iarg("blocks"), emulate);
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

// The parameters make_attn_params (attention.cuh) fills after its checks, from the same
// attn_params.
template <typename T>
AttnParams attn_params(AttnInputs& in) {
  in.B = iarg("B"), in.Tq = iarg("Tq"), in.Tk = iarg("Tk"), in.H = iarg("H"), in.KV = iarg("KV");
  in.D = iarg("D"), in.n_seqs = iarg("nseq");
  const int B = in.B, Tq = in.Tq, Tk = in.Tk, H = in.H, KV = in.KV, D = in.D;
  AttnOperand q, k, v;
  if (g_args.count("fused") && iarg("fused")) {
    // q, k, v: heads [0, H), [H, H + KV), [H + KV, H + 2 KV) of one (B, T, H + 2 KV, D) buffer.
    if (Tq != Tk) simt::fail("runner: fused q/k/v need Tq == Tk");
    const int W = H + 2 * KV;
    in.qkv = read("qkv", (size_t)B * Tq * W * D * sizeof(T), offset(sizeof(T)));
    const T* base = in.qkv->as<const T>();
    const int64_t sb = (int64_t)Tq * W * D, st = (int64_t)W * D;
    q = {base, sb, st, D}, k = {base + (size_t)H * D, sb, st, D};
    v = {base + (size_t)(H + KV) * D, sb, st, D};
  } else {
    in.q = read("q", (size_t)B * Tq * H * D * sizeof(T), offset(sizeof(T)));
    in.k = read("k", (size_t)B * Tk * KV * D * sizeof(T), offset(sizeof(T)));
    in.v = read("v", (size_t)B * Tk * KV * D * sizeof(T), offset(sizeof(T)));
    q = {in.q->data, (int64_t)Tq * H * D, (int64_t)H * D, D};
    k = {in.k->data, (int64_t)Tk * KV * D, (int64_t)KV * D, D};
    v = {in.v->data, (int64_t)Tk * KV * D, (int64_t)KV * D, D};
  }
  const int* cu = nullptr;
  if (in.n_seqs > 0) {
    in.cu = read("cu", (in.n_seqs + 1) * sizeof(int));
    cu = in.cu->as<const int>();
  }
  return llama2::cuda::attn_params(q, k, v, sizeof(T), B, Tq, Tk, H, KV,
                                   static_cast<float>(farg("scale")), iarg("causal") != 0, cu,
                                   in.n_seqs);
}

template <typename T, int D>
void attn_fwd_d(AttnParams& p, AttnInputs& in) {
  Buffer out((size_t)in.B * in.Tq * in.H * D * sizeof(T));
  Buffer lse((size_t)in.B * in.H * in.Tq * sizeof(float));
  attn_set_forward_outputs(p, out.data, D, lse.as<float>());
  attention_fwd_launch<T, D>(p, emulate);
  write("out", out);
  write("lse", lse);
}

template <typename T, int D>
void attn_bwd_d(AttnParams& p, AttnInputs& in) {
  const size_t nq = (size_t)in.B * in.Tq * in.H * D, nk = (size_t)in.B * in.Tk * in.KV * D;
  auto out = read("out", nq * sizeof(T));
  auto dout = read("dout", nq * sizeof(T), offset(sizeof(T)));
  auto lse = read("lse", (size_t)in.B * in.H * in.Tq * sizeof(float));
  Buffer delta((size_t)in.B * in.H * in.Tq * sizeof(float)), dq(nq * sizeof(float));
  Buffer dk(nk * sizeof(T)), dv(nk * sizeof(T));
  std::memset(dq.data, 0, dq.bytes);  // at::zeros in the .cu
  const int64_t sb = (int64_t)in.Tq * in.H * D, st = (int64_t)in.H * D;
  attn_set_backward(p, {out->data, sb, st, D}, {dout->data, sb, st, D}, sizeof(T),
                    lse->as<const float>(), delta.as<float>(), dq.as<float>(), dk.data, dv.data);
  attention_bwd_launch<T, D>(p, emulate);
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
