// Prints the dynamic shared memory (bytes) and threads of each attention kernel's block, from the
// layouts in csrc/cuda/attention_kernels.cuh, for tests/test_cuda_resources.py:
//   fwd <dtype> <D> <threads> <bytes>
//   bwd <dtype> <D> <threads> <bytes>
#include <cstdio>

#include "attention_kernels.cuh"

using namespace llama2::cuda;

template <typename T, int D>
void print(const char* name) {
  using F = FwdLayout<T, D, fwd_warps<T>()>;
  using B = BwdLayout<T, D, kBwdWarps>;
  std::printf("fwd %s %d %d %zu\n", name, D, F::NT, F::bytes);
  std::printf("bwd %s %d %d %zu\n", name, D, B::NT, B::bytes);
}

template <typename T>
void all(const char* name) {
  print<T, 16>(name);
  print<T, 32>(name);
  print<T, 48>(name);
  print<T, 64>(name);
  print<T, 128>(name);
}

int main() {
  all<float>("float");
  all<__half>("__half");
  all<__nv_bfloat16>("__nv_bfloat16");
  return 0;
}
