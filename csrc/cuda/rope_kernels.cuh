// RoPE kernel: the device code of rope.cu (which launches it), in a header so that tests/cuda_emu
// can compile the same code for the CPU. See rope.cu for the formula, shapes and memory traffic.
#pragma once

#include <algorithm>

#include "device.cuh"

namespace llama2 {
namespace cuda {

// VEC elements (VEC/2 pairs) per thread; VEC == 2 is the unaligned fallback with scalar loads.
template <typename T, typename CT, int VEC>
__global__ void rope_kernel(const T* __restrict__ x, const int64_t* __restrict__ positions,
                            const CT* __restrict__ cos, const CT* __restrict__ sin,
                            T* __restrict__ out, int64_t n_items, int T_, int H, int D, int64_t P,
                            int64_t sb, int64_t st, int64_t sh, float sign) {
  using V = Vec<T, VEC>;
  const int per_row = D / VEC;
  const int half_d = D / 2;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n_items;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // idx -> (b, t, h, chunk v); row = (b*T + t)*H + h indexes the contiguous output.
    const int v = static_cast<int>(idx % per_row);
    const int64_t row = idx / per_row;
    const int h = static_cast<int>(row % H);
    const int64_t bt = row / H;
    const int t = static_cast<int>(bt % T_);
    const int64_t b = bt / T_;
    const int64_t p = positions[bt];
    // Positions are validated where they are made (no host sync here); out of range is a device
    // assert rather than a read outside the table.
    CUDA_KERNEL_ASSERT(p >= 0 && p < P);
    const T* xs = x + b * sb + t * st + h * sh + v * VEC;
    V xv;
    if constexpr (VEC == 2) {
      xv.v[0] = xs[0];
      xv.v[1] = xs[1];
    } else {
      xv = *reinterpret_cast<const V*>(xs);
    }
    const CT* cr = cos + p * half_d + v * (VEC / 2);
    const CT* sr = sin + p * half_d + v * (VEC / 2);
    V o;
#pragma unroll
    for (int k = 0; k < VEC / 2; ++k) {
      const float c = to_float(cr[k]), s = sign * to_float(sr[k]);
      const float x0 = to_float(xv.v[2 * k]), x1 = to_float(xv.v[2 * k + 1]);
      o.v[2 * k] = from_float<T>(x0 * c - x1 * s);
      o.v[2 * k + 1] = from_float<T>(x0 * s + x1 * c);
    }
    T* os = out + row * D + v * VEC;
    if constexpr (VEC == 2) {
      os[0] = o.v[0];
      os[1] = o.v[1];
    } else {
      *reinterpret_cast<V*>(os) = o;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: which kernel and how many blocks (see device.cuh)
// ---------------------------------------------------------------------------------------------

// x (B, T, H, D) with strides (sb, st, sh, 1), positions (B, T), cos/sin (P, D/2) -> out
// (B, T, H, D) contiguous. 256 threads, one per VEC elements, at most max_blocks blocks
// (grid-stride). 16-byte vectors when every row of x starts on a 16-byte boundary, else pairs.
template <typename T, typename CT, typename Launch>
void rope_launch(const T* x, int64_t sb, int64_t st, int64_t sh, const int64_t* positions,
                 const CT* cos, const CT* sin, T* out, int B, int T_, int H, int D, int64_t P,
                 bool inverse, int64_t max_blocks, Launch&& launch) {
  constexpr int V = vec16<T>();
  const bool vec = D % V == 0 && aligned16(x) && sb % V == 0 && st % V == 0 && sh % V == 0;
  const auto go = [&](auto kernel, int per_item) {
    const int64_t n_items = static_cast<int64_t>(B) * T_ * H * (D / per_item);
    const int threads = 256;
    const int blocks =
        static_cast<int>(std::min<int64_t>((n_items + threads - 1) / threads, max_blocks));
    launch(kernel, LaunchConfig{blocks, threads}, x, positions, cos, sin, out, n_items, T_, H, D,
           P, sb, st, sh, inverse ? -1.0f : 1.0f);
  };
  if (vec) {
    go(rope_kernel<T, CT, V>, V);
  } else {
    go(rope_kernel<T, CT, 2>, 2);
  }
}

}  // namespace cuda
}  // namespace llama2
