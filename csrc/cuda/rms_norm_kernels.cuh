// RMSNorm kernels, forward and backward: the device code of rms_norm.cu (which launches them), in
// a header so that tests/cuda_emu can compile the same code for the CPU. See rms_norm.cu for the
// formula, shapes and memory traffic.
#pragma once

#include <algorithm>
#include <initializer_list>

#include "device.cuh"

namespace llama2 {
namespace cuda {

// Threads per block for rows of C elements moved VEC at a time: one vector per thread when that
// fits, multiples of a warp, 32 to 512.
inline int row_threads(int64_t C, int vec) {
  const int64_t vectors = (C + vec - 1) / vec;
  const int64_t warps = (vectors + 31) / 32;
  return static_cast<int>(std::min<int64_t>(16, std::max<int64_t>(1, warps)) * 32);
}

template <typename T, int VEC>
__global__ void rms_norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ weight,
                                    T* __restrict__ out, float* __restrict__ rstd, int64_t N,
                                    int C, float eps) {
  using V = Vec<T, VEC>;
  LLAMA2_SHARED_ARRAY(float, shm, 32);
  const int n_vec = C / VEC;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const V* xr = reinterpret_cast<const V*>(x + row * C);
    V* outr = reinterpret_cast<V*>(out + row * C);
    // Pass 1: sum of squares.
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n_vec; i += blockDim.x) {
      const V xv = xr[i];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float f = to_float(xv.v[k]);
        ss += f * f;
      }
    }
    ss = block_sum(ss, shm);
    const float r = rsqrtf(ss / C + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    // Pass 2: scale (the row is in L1/L2 now).
    const V* wv = reinterpret_cast<const V*>(weight);
    for (int i = threadIdx.x; i < n_vec; i += blockDim.x) {
      const V xv = xr[i];
      const V w = wv[i];
      V o;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float normed = to_float(from_float<T>(to_float(xv.v[k]) * r));
        o.v[k] = from_float<T>(normed * to_float(w.v[k]));
      }
      outr[i] = o;
    }
  }
}

// Each block handles rows blockIdx.x, blockIdx.x + gridDim.x, ...; its grad_weight partial sums
// live in dynamic shared memory (C floats) and land in partial[blockIdx.x, :].
template <typename T, int VEC>
__global__ void rms_norm_bwd_kernel(const T* __restrict__ grad_out, const T* __restrict__ x,
                                    const T* __restrict__ weight, const float* __restrict__ rstd,
                                    T* __restrict__ grad_x, float* __restrict__ partial, int64_t N,
                                    int C) {
  using V = Vec<T, VEC>;
  float* dw_acc = reinterpret_cast<float*>(dynamic_smem());  // (C)
  LLAMA2_SHARED_ARRAY(float, shm, 32);
  const int n_vec = C / VEC;
  const V* wv = reinterpret_cast<const V*>(weight);
  // Thread i owns columns [i*VEC, i*VEC + VEC) for every i = threadIdx.x + k*blockDim.x.
  for (int i = threadIdx.x; i < n_vec; i += blockDim.x) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) dw_acc[i * VEC + k] = 0.0f;
  }
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const V* gr = reinterpret_cast<const V*>(grad_out + row * C);
    const V* xr = reinterpret_cast<const V*>(x + row * C);
    V* dxr = reinterpret_cast<V*>(grad_x + row * C);
    const float r = rstd[row];
    // Pass 1: dot = sum(g * w * x); accumulate dw += g * round(x * r) on the way.
    float dot = 0.0f;
    for (int i = threadIdx.x; i < n_vec; i += blockDim.x) {
      const V gv = gr[i], xv = xr[i], w = wv[i];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float g = to_float(gv.v[k]), xf = to_float(xv.v[k]);
        dot += g * to_float(w.v[k]) * xf;
        dw_acc[i * VEC + k] += g * to_float(from_float<T>(xf * r));
      }
    }
    dot = block_sum(dot, shm);
    const float c = r * r * r * dot / C;
    // Pass 2: dx = r * g * w - c * x.
    for (int i = threadIdx.x; i < n_vec; i += blockDim.x) {
      const V gv = gr[i], xv = xr[i], w = wv[i];
      V o;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        o.v[k] = from_float<T>(r * to_float(gv.v[k]) * to_float(w.v[k]) - c * to_float(xv.v[k]));
      }
      dxr[i] = o;
    }
  }
  float* part = partial + static_cast<int64_t>(blockIdx.x) * C;
  for (int i = threadIdx.x; i < n_vec; i += blockDim.x) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) part[i * VEC + k] = dw_acc[i * VEC + k];
  }
}

// grad_weight[j] = sum over blocks b of partial[b, j], in order b = 0, 1, ... (deterministic).
template <typename T>
__global__ void sum_columns_kernel(const float* __restrict__ partial, T* __restrict__ out,
                                   int rows, int C) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= C) return;
  float s = 0.0f;
  for (int b = 0; b < rows; ++b) s += partial[static_cast<int64_t>(b) * C + j];
  out[j] = from_float<T>(s);
}

// ---------------------------------------------------------------------------------------------
// Host side: which kernel, how many blocks and threads, how much shared memory (see device.cuh)
// ---------------------------------------------------------------------------------------------

// 16-byte vectors when C is a whole number of them and every row starts on a 16-byte boundary.
template <typename T>
bool rms_use_vec(int64_t C, std::initializer_list<const void*> ptrs) {
  if (C % vec16<T>() != 0) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

// x, out (N, C), weight (C) -> out, rstd (N). One block per row, at most max_blocks blocks
// (grid-stride over the rows).
template <typename T, typename Launch>
void rms_norm_fwd_launch(const T* x, const T* weight, T* out, float* rstd, int64_t N, int C,
                         float eps, int64_t max_blocks, Launch&& launch) {
  const int grid = static_cast<int>(std::min<int64_t>(N, max_blocks));
  const size_t static_bytes = 32 * sizeof(float);  // shm
  if (rms_use_vec<T>(C, {x, weight, out})) {
    constexpr int VEC = vec16<T>();
    launch(rms_norm_fwd_kernel<T, VEC>, LaunchConfig{grid, row_threads(C, VEC), 0, static_bytes},
           x, weight, out, rstd, N, C, eps);
  } else {
    launch(rms_norm_fwd_kernel<T, 1>, LaunchConfig{grid, row_threads(C, 1), 0, static_bytes}, x,
           weight, out, rstd, N, C, eps);
  }
}

// Blocks of the backward: each writes one row of the (blocks, C) float32 partial sums of dw.
inline int rms_norm_bwd_blocks(int64_t N, int64_t max_blocks) {
  return static_cast<int>(std::min<int64_t>(N, max_blocks));
}

// g, x (N, C), weight (C), rstd (N) -> dx (N, C), dw (C), through partial
// (rms_norm_bwd_blocks(N, max_blocks), C) float32.
template <typename T, typename Launch>
void rms_norm_bwd_launch(const T* g, const T* x, const T* weight, const float* rstd, T* dx,
                         T* dw, float* partial, int64_t N, int C, int64_t max_blocks,
                         Launch&& launch) {
  const int grid = rms_norm_bwd_blocks(N, max_blocks);
  const size_t shared = static_cast<size_t>(C) * sizeof(float);  // dw_acc
  const size_t static_bytes = 32 * sizeof(float);                // shm
  if (rms_use_vec<T>(C, {g, x, weight, dx})) {
    constexpr int VEC = vec16<T>();
    launch(rms_norm_bwd_kernel<T, VEC>,
           LaunchConfig{grid, row_threads(C, VEC), shared, static_bytes}, g, x, weight, rstd, dx,
           partial, N, C);
  } else {
    launch(rms_norm_bwd_kernel<T, 1>, LaunchConfig{grid, row_threads(C, 1), shared, static_bytes},
           g, x, weight, rstd, dx, partial, N, C);
  }
  const int threads = 256;
  launch(sum_columns_kernel<T>, LaunchConfig{(C + threads - 1) / threads, threads},
         static_cast<const float*>(partial), dw, grid, C);
}

}  // namespace cuda
}  // namespace llama2
