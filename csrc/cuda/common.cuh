// Shared helpers for the CUDA kernels: dtype dispatch onto CUDA's own 16-bit types, float
// conversions, 16-byte vector loads, warp/block sums, and host-side input checks in words.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace llama2 {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// dtype dispatch: scalar_t is float, __half or __nv_bfloat16 (the types the CUDA intrinsics and
// WMMA fragments take), so data pointers are reinterpret_cast from the tensor's storage.
// ---------------------------------------------------------------------------------------------

#define LLAMA2_DISPATCH_FLOAT_HALF_BF16(DTYPE, OP, ...)                                         \
  [&] {                                                                                         \
    switch (DTYPE) {                                                                            \
      case at::kFloat: {                                                                        \
        using scalar_t = float;                                                                 \
        return __VA_ARGS__();                                                                   \
      }                                                                                         \
      case at::kHalf: {                                                                         \
        using scalar_t = __half;                                                                \
        return __VA_ARGS__();                                                                   \
      }                                                                                         \
      case at::kBFloat16: {                                                                     \
        using scalar_t = __nv_bfloat16;                                                         \
        return __VA_ARGS__();                                                                   \
      }                                                                                         \
      default:                                                                                  \
        TORCH_CHECK(false, OP, ": the CUDA kernel takes float32, float16 or bfloat16, got ",    \
                    DTYPE, "; cast the inputs or use the reference path");                      \
    }                                                                                           \
  }()

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
// Reductions
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Device queries (plain CUDA runtime calls: ATen/cuda/CUDAContext.h would pull in cuSPARSE/cuBLAS
// headers that a bare toolkit may lack)
// ---------------------------------------------------------------------------------------------

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline int device_attribute(cudaDeviceAttr attr) {
  int device = 0, value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

inline int sm_count() { return device_attribute(cudaDevAttrMultiProcessorCount); }

// ---------------------------------------------------------------------------------------------
// Host-side checks
// ---------------------------------------------------------------------------------------------

inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " is on ", t.device(),
              " but this is the CUDA kernel; move all inputs to the same CUDA device");
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const char* name_a, const char* name_b) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", name_a, " is on ", a.device(), " but ", name_b,
              " is on ", b.device(), "; move all inputs to the same CUDA device");
}

inline void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* op,
                             const char* name_a, const char* name_b) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", name_a, " is ", a.scalar_type(),
              " but ", name_b, " is ", b.scalar_type(), "; they must have the same dtype");
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name,
                      const char* shape) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", shape, " (", dim, " dims), got shape ",
              t.sizes());
}

// True while the current stream is being captured into a CUDA graph: then no check may read
// device memory back to the host (that would synchronize and break the capture).
inline bool capturing() {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(current_stream(), &status));
  return status != cudaStreamCaptureStatusNone;
}

// Raises the block's dynamic shared memory limit past the default 48 KB, after checking that the
// device has that much.
template <typename Kernel>
void set_shared_memory(Kernel kernel, size_t dynamic_bytes, const char* op,
                       size_t static_bytes = 0) {
  // The opt-in limit covers static + dynamic shared memory; the attribute names the dynamic part.
  const int max_optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  const size_t bytes = dynamic_bytes + static_bytes;
  TORCH_CHECK(bytes <= static_cast<size_t>(max_optin), op, ": this kernel needs ", bytes,
              " bytes of shared memory per block but the GPU offers ", max_optin,
              "; use a smaller size or the reference path");
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(dynamic_bytes)));
  }
}

}  // namespace cuda
}  // namespace llama2
