// Device-side basics shared by every kernel: float conversions, 16-byte vectors, warp/block sums
// and the block's dynamic shared memory. No ATen here, so the kernel headers (*_kernels.cuh) that
// build on it compile two ways: with nvcc for the GPU (csrc/cuda/*.cu), and as plain C++ for the
// CPU under tests/cuda_emu/simt.h, which emulates threads, barriers, shuffles and WMMA
// (LLAMA2_CUDA_EMULATION; see tests/test_cuda_emulated.py).
#pragma once

#ifdef LLAMA2_CUDA_EMULATION
#include "simt.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>
#include <type_traits>

namespace llama2 {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// Conversions: every kernel loads its inputs to float, computes in float, and rounds once on store.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---------------------------------------------------------------------------------------------
// 16-byte vectors: VEC elements of T moved by one load/store instruction (LDG.128 / STG.128).
// ---------------------------------------------------------------------------------------------

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// Elements of T in 16 bytes: 4 floats or 8 halves.
template <typename T>
__host__ __device__ constexpr int vec16() {
  return 16 / static_cast<int>(sizeof(T));
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ---------------------------------------------------------------------------------------------
// Launches: the host side computes them in plain functions (the *_launch functions of the kernel
// headers) that both the .cu launchers and the CPU emulation call, so the emulated tests run the
// real launch logic. Such a function picks the kernel and its configuration and hands them to a
// callback, launch(kernel, config, args...): a <<<>>> launch on the GPU (common.cuh), simt::launch
// in the emulation.
// ---------------------------------------------------------------------------------------------

struct LaunchConfig {
  dim3 grid, block;
  size_t shared_bytes = 0;  // dynamic shared memory, the <<<>>>'s third argument
  size_t static_bytes = 0;  // the kernel's static shared arrays (for the opt-in limit check)
};

// ---------------------------------------------------------------------------------------------
// Shared memory and reductions
// ---------------------------------------------------------------------------------------------

// The block's dynamic shared memory (the launch's third <<<>>> argument), 128-byte aligned.
#ifdef LLAMA2_CUDA_EMULATION
inline unsigned char* dynamic_smem() { return simt::dynamic_smem(); }
#else
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(128) unsigned char llama2_smem[];
  return llama2_smem;
}
#endif

// A static shared array, T name[N], of the block. In the CPU emulation every block gets its own
// copy (simt::static_shared, keyed by this declaration), so races between blocks can show.
#ifdef LLAMA2_CUDA_EMULATION
#define LLAMA2_SHARED_ARRAY(T, name, N)                                                  \
  static const char name##_key = 0;                                                     \
  T(&name)[N] = *static_cast<T(*)[N]>(simt::static_shared(&name##_key, sizeof(T[N]), alignof(T)))
#else
#define LLAMA2_SHARED_ARRAY(T, name, N) __shared__ T name[N]
#endif

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
// shm holds 32 floats; the trailing barrier lets the caller call again right away.
__device__ __forceinline__ float block_sum(float v, float* shm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  const int n_warps = blockDim.x >> 5;
  float total = lane < n_warps ? shm[lane] : 0.0f;
  total = warp_sum(total);
  __syncthreads();
  return total;
}

}  // namespace cuda
}  // namespace llama2
