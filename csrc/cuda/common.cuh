// Host-side helpers for the CUDA ops: dtype dispatch onto CUDA's own 16-bit types, cached device
// queries, input checks in words, and the shared-memory opt-in. The device-side helpers (float
// conversions, vectors, warp/block sums) are in device.cuh, which the kernel headers include.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <set>
#include <tuple>
#include <type_traits>
#include <utility>

#include "device.cuh"

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
// Device queries (plain CUDA runtime calls: ATen/cuda/CUDAContext.h would pull in cuSPARSE/cuBLAS
// headers that a bare toolkit may lack)
// ---------------------------------------------------------------------------------------------

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline int current_device() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

inline int device_attribute(cudaDeviceAttr attr) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, current_device()));
  return value;
}

// Streaming multiprocessors of the current device, asked once per device (grids are sized by it
// on every call).
inline int sm_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices] = {};
  const int device = current_device();
  if (device >= kMaxDevices) return device_attribute(cudaDevAttrMultiProcessorCount);
  int n = cached[device].load(std::memory_order_relaxed);
  if (n == 0) {
    n = device_attribute(cudaDevAttrMultiProcessorCount);
    cached[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

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

// Raises the block's dynamic shared memory limit past the default 48 KB, after checking that the
// device has that much. Done once per (kernel, device, size): the attribute stays set, so later
// calls only look the kernel up in a small set.
template <typename Kernel>
void set_shared_memory(Kernel kernel, size_t dynamic_bytes, const char* op,
                       size_t static_bytes = 0) {
  static std::mutex mutex;
  static std::set<std::tuple<const void*, int, size_t>> done;
  const int device = current_device();
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), device, dynamic_bytes);
  const std::lock_guard<std::mutex> lock(mutex);
  if (done.count(key)) return;
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
  done.insert(key);
}

// The launch callback of the *_launch functions (device.cuh): kernel<<<grid, block, shared_bytes,
// stream>>>(args...) on the current stream, after the shared-memory opt-in where the kernel uses
// dynamic shared memory, with the launch check.
inline auto stream_launcher(const char* op) {
  return [op](auto kernel, const LaunchConfig& c, auto... args) {
    if (c.shared_bytes > 0) set_shared_memory(kernel, c.shared_bytes, op, c.static_bytes);
    kernel<<<c.grid, c.block, c.shared_bytes, current_stream()>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
}

}  // namespace cuda
}  // namespace llama2
