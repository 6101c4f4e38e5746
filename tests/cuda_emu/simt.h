// A small SIMT emulator: runs the real CUDA kernels of csrc/cuda/*_kernels.cuh on the CPU.
//
// device.cuh includes this header instead of the CUDA headers when LLAMA2_CUDA_EMULATION is
// defined, and the kernel code compiles as plain C++. What it models:
//   - every CUDA thread of a block is a fiber (ucontext) with its own stack, threadIdx and
//     blockIdx; a scheduler runs each fiber until it waits at a barrier or returns. The blocks of
//     a grid run in a shuffled order, one at a time or (ConcurrentBlocks) several interleaved;
//   - __syncthreads is a barrier over the block's fibers, __syncwarp one over the warp's 32; a
//     fiber that returns counts as arrived (as on the GPU); a barrier that can never fill (some
//     threads wait at __syncthreads, the others at a warp barrier) fails as a deadlock;
//   - __shfl_xor_sync exchanges registers only: the lanes meet (a rendezvous of their own, apart
//     from __syncwarp's) and swap values, but no memory ordering comes with it, as on a GPU, so a
//     shuffle between a store to shared memory and another lane's read of it hides no race. It
//     fails if a lane of the warp has already returned;
//   - atomicAdd is std::atomic_ref::fetch_add;
//   - dynamic shared memory is one buffer per block, filled with 0xff bytes (NaN floats) before
//     every block, so a read of shared memory that no thread wrote shows up in the results; static
//     shared arrays (LLAMA2_SHARED_ARRAY in device.cuh) live in a second such buffer per block;
//   - WMMA (nvcuda::wmma, m16n16k16, float accumulators) is warp-wide reference code: matrix_a/b
//     fragments hold the whole tile in every lane (any lane may read any element on a GPU too, the
//     layout being opaque); accumulator fragments hold 8 elements per lane, loaded and stored by
//     that lane only. Every load/store checks the rules of the CUDA programming guide: pointer
//     256-bit aligned, ldm a multiple of 16 bytes and at least 16 elements, and the 16 x ldm
//     footprint inside the dynamic shared memory when the pointer points there.
// Races: built with -fsanitize=thread, ThreadSanitizer treats every fiber as a thread and sees
// only the ordering the barriers create (each arriving fiber releases, each leaving fiber
// acquires; shuffles neither release nor acquire), so two accesses to the same byte, one a write,
// that no barrier orders are reported: a read of shared memory racing a write in the same barrier
// epoch (a missing __syncthreads or __syncwarp) fails the run, like compute-sanitizer's racecheck.
// With blocks interleaved (ConcurrentBlocks), so does a race between blocks on global memory (a
// sum without atomics, two blocks writing the same row).
//
// For a student: this is also a way to step through a CUDA kernel in gdb on a laptop (build the
// runner with -O0 -g, `break attention_fwd_kernel`; `print simt::thread_index()` and
// `print simt::block_index()` say which CUDA thread is stopped).
//
// Not modelled: warp-synchronous code without __syncwarp (every lane is independent here, as
// Volta and later allow), partial shuffle masks, the GPU's exact float rounding (exp2f, rsqrtf
// and the tensor cores' sums are computed in ordinary float here).
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <type_traits>
#include <vector>

#include <ucontext.h>

// ---------------------------------------------------------------------------------------------
// CUDA keywords and built-in types
// ---------------------------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// A plain `__shared__` declaration would be one copy for the whole process here, shared by
// interleaved blocks; kernels declare static shared arrays with LLAMA2_SHARED_ARRAY (device.cuh),
// which gives each block its own (simt::static_shared).
#define __shared__ \
  static_assert(false, "simt.h: declare static shared arrays with LLAMA2_SHARED_ARRAY");
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// threadIdx and blockIdx are macros (below) that ask the scheduler which fiber is running.
inline dim3 blockDim;
inline dim3 gridDim;

struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// CUDA's overloaded min/max on mixed integer types.
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

// ---------------------------------------------------------------------------------------------
// float16 and bfloat16: storage types with CUDA's conversion functions (round to nearest even)
// ---------------------------------------------------------------------------------------------

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  __nv_bfloat16 b;
  b.bits = v != v ? uint16_t(0x7fc0) : static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  return b;
}

// ---------------------------------------------------------------------------------------------
// The runtime: one fiber per CUDA thread, barriers, launches
// ---------------------------------------------------------------------------------------------

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#define SIMT_TSAN 1
// The emulator's own bookkeeping (scheduler state, barrier counters) is shared by all fibers on
// purpose; ThreadSanitizer checks only the kernel's memory, so these functions are not
// instrumented (and not inlined into kernel code, which is).
#define SIMT_RUNTIME inline __attribute__((no_sanitize_thread, noinline))
#else
#define SIMT_TSAN 0
#define SIMT_RUNTIME inline
#endif

namespace simt {

[[noreturn]] inline void fail(const char* fmt, ...) {
  std::va_list args;
  va_start(args, fmt);
  std::fprintf(stderr, "simt: ");
  std::vfprintf(stderr, fmt, args);
  std::fprintf(stderr, "\n");
  va_end(args);
  std::fflush(stderr);
  std::_Exit(3);
}

// ThreadSanitizer sees each fiber as a thread of its own. Switching fibers creates no ordering;
// the barriers below create it explicitly: every arriving fiber releases into the barrier's
// variable, every fiber leaving the barrier acquires from it.
inline void tsan_release(void* addr) {
#if SIMT_TSAN
  __tsan_release(addr);
#else
  (void)addr;
#endif
}
inline void tsan_acquire(void* addr) {
#if SIMT_TSAN
  __tsan_acquire(addr);
#else
  (void)addr;
#endif
}

enum class State { kReady, kWaitBlock, kWaitWarp, kWaitShuffle, kDone };

struct Fiber {
  ucontext_t ctx;
  dim3 index;  // threadIdx
  char* stack = nullptr;
  State state = State::kReady;
  const char* where = "";  // the barrier it waits at
  void* tsan = nullptr;
};

// A barrier over `expected` fibers; a fiber that returns from the kernel no longer counts.
struct Barrier {
  int expected = 0, arrived = 0;
  uint64_t generation = 0;
  char sync[2];  // ThreadSanitizer's variables, alternating by generation
};

struct Warp {
  Barrier barrier;      // __syncwarp
  Barrier shuffle;      // the rendezvous of a shuffle
  uint64_t slots[32];   // shuffle exchange (runtime memory: invisible to ThreadSanitizer)
};

// Static shared arrays: at most this many bytes per block (the GPU's limit) and declarations.
constexpr size_t kStaticSmemBytes = 48 * 1024;
constexpr int kStaticArrays = 16;

// Plain arrays, not std::vector: the runtime's accesses must stay out of ThreadSanitizer's view.
struct Block {
  int nt = 0;
  Fiber* fibers = nullptr;  // (nt)
  Warp* warps = nullptr;    // (nt / 32)
  Barrier barrier;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  unsigned char* static_smem = nullptr;    // (kStaticSmemBytes), this block's static arrays
  size_t static_used = 0;
  int n_static = 0;
  const void* static_keys[kStaticArrays];  // one key per declaration (LLAMA2_SHARED_ARRAY)
  size_t static_offsets[kStaticArrays];
  ucontext_t scheduler;
  void* scheduler_tsan = nullptr;
  int current = 0;                 // the fiber running now
  dim3 index;                      // blockIdx
  std::function<void()> kernel;    // the kernel call with its arguments
  char block_sync;                 // ThreadSanitizer: everything before a block, before it
};

inline Block* g_block = nullptr;  // the block of the fiber running now

SIMT_RUNTIME int thread_id() { return g_block->current; }
SIMT_RUNTIME int lane_id() { return g_block->current & 31; }
SIMT_RUNTIME Warp& warp() { return g_block->warps[g_block->current >> 5]; }
SIMT_RUNTIME int warp_size_now() { return warp().barrier.expected; }  // lanes not yet returned
SIMT_RUNTIME unsigned char* dynamic_smem() { return g_block->smem; }
SIMT_RUNTIME const Block* block() { return g_block; }
SIMT_RUNTIME dim3 thread_index() { return g_block->fibers[g_block->current].index; }
SIMT_RUNTIME dim3 block_index() { return g_block->index; }

// From the running fiber back to the scheduler.
SIMT_RUNTIME void yield() {
  Block& b = *g_block;
  Fiber& f = b.fibers[b.current];
#if SIMT_TSAN
  __tsan_switch_to_fiber(b.scheduler_tsan, __tsan_switch_to_fiber_no_sync);
#endif
  swapcontext(&f.ctx, &b.scheduler);
}

// Arrive at `bar` (the block's or a warp's) and wait until `expected` fibers have arrived.
// The barrier's fibers are [first, first + count). ordering: the barrier orders memory (each
// arriving fiber releases, each leaving one acquires); a shuffle's rendezvous does not.
SIMT_RUNTIME void arrive_and_wait(Barrier& bar, State wait_state, const char* what, int first,
                                  int count, bool ordering = true) {
  Block& b = *g_block;
  Fiber& f = b.fibers[b.current];
  const uint64_t generation = bar.generation;
  if (ordering) tsan_release(&bar.sync[generation & 1]);
  if (++bar.arrived >= bar.expected) {
    bar.arrived = 0;
    ++bar.generation;
    for (int t = first; t < first + count; ++t) {
      if (b.fibers[t].state == wait_state) b.fibers[t].state = State::kReady;
    }
  } else {
    f.state = wait_state;
    f.where = what;
    yield();
  }
  if (ordering) tsan_acquire(&bar.sync[generation & 1]);
}

// A fiber leaves a barrier for good (it returned from the kernel): release the others if they
// were only waiting for it.
SIMT_RUNTIME void leave(Barrier& bar, State wait_state, int first, int count) {
  Block& b = *g_block;
  --bar.expected;
  if (bar.arrived > 0 && bar.arrived >= bar.expected) {
    bar.arrived = 0;
    ++bar.generation;
    for (int t = first; t < first + count; ++t) {
      if (b.fibers[t].state == wait_state) b.fibers[t].state = State::kReady;
    }
  }
}

inline const char* kSyncthreads = "__syncthreads";
inline const char* kWarpBarrier = "a warp barrier";
inline const char* kShuffle = "a shuffle";

SIMT_RUNTIME void fiber_start() { tsan_acquire(&g_block->block_sync); }

SIMT_RUNTIME void fiber_finish() {
  Block& b = *g_block;
  const int tid = b.current;
  b.fibers[tid].state = State::kDone;
  leave(b.warps[tid >> 5].barrier, State::kWaitWarp, tid & ~31, 32);
  leave(b.warps[tid >> 5].shuffle, State::kWaitShuffle, tid & ~31, 32);
  leave(b.barrier, State::kWaitBlock, 0, b.nt);
  tsan_release(&b.block_sync);
  yield();  // never resumed
}

SIMT_RUNTIME void syncthreads() {
  arrive_and_wait(g_block->barrier, State::kWaitBlock, kSyncthreads, 0, g_block->nt);
}

SIMT_RUNTIME void syncwarp() {
  arrive_and_wait(warp().barrier, State::kWaitWarp, kWarpBarrier, thread_id() & ~31, 32);
}

// Lane `src`'s value of this shuffle. The lanes meet twice (all written, then all read), with no
// memory ordering: the slots are the runtime's memory, which ThreadSanitizer does not watch.
SIMT_RUNTIME uint64_t shuffle(uint64_t v, int src) {
  Warp& w = warp();
  const int first = thread_id() & ~31;
  w.slots[lane_id()] = v;
  arrive_and_wait(w.shuffle, State::kWaitShuffle, kShuffle, first, 32, /*ordering=*/false);
  const uint64_t r = w.slots[src & 31];
  arrive_and_wait(w.shuffle, State::kWaitShuffle, kShuffle, first, 32, /*ordering=*/false);
  return r;
}

// This block's copy of the static shared array declared at `key` (LLAMA2_SHARED_ARRAY): placed on
// the first call in the block, poisoned like dynamic shared memory (launch fills it with 0xff).
SIMT_RUNTIME void* static_shared(const void* key, size_t bytes, size_t align) {
  Block& b = *g_block;
  for (int i = 0; i < b.n_static; ++i) {
    if (b.static_keys[i] == key) return b.static_smem + b.static_offsets[i];
  }
  const size_t off = (b.static_used + align - 1) / align * align;
  if (b.n_static == kStaticArrays || off + bytes > kStaticSmemBytes) {
    fail("static shared arrays: more than %zu bytes or %d arrays per block", kStaticSmemBytes,
         kStaticArrays);
  }
  b.static_keys[b.n_static] = key;
  b.static_offsets[b.n_static++] = off;
  b.static_used = off + bytes;
  return b.static_smem + off;
}

SIMT_RUNTIME void kernel_call() { g_block->kernel(); }

inline void fiber_main() {
  fiber_start();
  kernel_call();
  fiber_finish();
}

// Blocks run at the same time (their fibers interleaved) by the next launches; 1 = one block at
// a time. With more, ThreadSanitizer also sees races between blocks on global memory (two blocks
// writing the same output, a sum without atomics).
inline int g_concurrent_blocks = 1;

struct ConcurrentBlocks {
  int saved;
  explicit ConcurrentBlocks(int n) : saved(g_concurrent_blocks) { g_concurrent_blocks = n; }
  ~ConcurrentBlocks() { g_concurrent_blocks = saved; }
};

// Runs kernel(args...) on every thread of every block of the grid, as <<<grid, block, smem>>>.
template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t smem_bytes, Kernel kernel, Args... args) {
  const int nt = static_cast<int>(block.x * block.y * block.z);
  const int n_blocks = static_cast<int>(grid.x * grid.y * grid.z);
  if (nt <= 0 || nt > 1024) fail("launch: %d threads per block (1..1024)", nt);
  if (nt % 32 != 0) fail("launch: %d threads per block is not a whole number of warps", nt);
  if (n_blocks <= 0) return;
  const auto start = std::chrono::steady_clock::now();
  blockDim = block;
  gridDim = grid;
  const int group = std::max(1, std::min(g_concurrent_blocks, n_blocks));
  // On the heap: the stack of launch() is reused by the next launch, which ThreadSanitizer would
  // see as a race with this launch's fibers.
  Block* blocks = new Block[group];
  constexpr size_t kStack = 256 * 1024;
  const size_t alloc = (std::max<size_t>(smem_bytes, 1) + 255) / 256 * 256;
  for (int j = 0; j < group; ++j) {
    Block& b = blocks[j];
    b.nt = nt;
    b.fibers = new Fiber[nt];
    b.warps = new Warp[nt / 32];
    for (int t = 0; t < nt; ++t) {
      b.fibers[t].stack = new char[kStack];
#if SIMT_TSAN
      b.fibers[t].tsan = __tsan_create_fiber(0);
#endif
    }
#if SIMT_TSAN
    b.scheduler_tsan = __tsan_get_current_fiber();
#endif
    b.smem_bytes = smem_bytes;
    b.smem = static_cast<unsigned char*>(std::aligned_alloc(256, alloc));
    b.static_smem = static_cast<unsigned char*>(std::aligned_alloc(256, kStaticSmemBytes));
    b.kernel = [=] { kernel(args...); };
  }
  // The blocks in a shuffled order: a GPU gives no order either.
  std::vector<int> order(n_blocks);
  for (int i = 0; i < n_blocks; ++i) order[i] = i;
  const char* seed = std::getenv("SIMT_SEED");
  std::mt19937 rng(seed ? std::atoi(seed) : 0);
  std::shuffle(order.begin(), order.end(), rng);

  for (int g0 = 0; g0 < n_blocks; g0 += group) {
    const int ng = std::min(group, n_blocks - g0);
    for (int j = 0; j < ng; ++j) {
      Block& b = blocks[j];
      const int blk = order[g0 + j];
      b.index = dim3(blk % grid.x, (blk / grid.x) % grid.y, blk / (grid.x * grid.y));
      b.barrier.expected = nt;
      b.barrier.arrived = 0;
      for (int w = 0; w < nt / 32; ++w) {
        b.warps[w].barrier.expected = b.warps[w].shuffle.expected = 32;
        b.warps[w].barrier.arrived = b.warps[w].shuffle.arrived = 0;
      }
      std::memset(b.smem, 0xff, alloc);  // poison: an unwritten float reads as NaN
      std::memset(b.static_smem, 0xff, kStaticSmemBytes);
      b.static_used = 0;
      b.n_static = 0;
      for (int t = 0; t < nt; ++t) {
        Fiber& f = b.fibers[t];
        f.state = State::kReady;
        f.index = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack;
        f.ctx.uc_stack.ss_size = kStack;
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, fiber_main, 0);
      }
      tsan_release(&b.block_sync);  // the setup above happens before the block's threads
    }
    // Round robin over the fibers that can run, each until it waits at a barrier or returns.
    int done = 0;
    while (done < ng * nt) {
      bool progress = false;
      for (int j = 0; j < ng; ++j) {
        Block& b = blocks[j];
        for (int t = 0; t < nt; ++t) {
          Fiber& f = b.fibers[t];
          if (f.state != State::kReady) continue;
          progress = true;
          g_block = &b;
          b.current = t;
#if SIMT_TSAN
          __tsan_switch_to_fiber(f.tsan, __tsan_switch_to_fiber_no_sync);
#endif
          swapcontext(&b.scheduler, &f.ctx);
          if (f.state == State::kDone) ++done;
        }
      }
      if (!progress) {
        for (int j = 0; j < ng; ++j) {
          int block_waiters = 0, warp_waiters = 0, shuffle_waiters = 0, returned = 0;
          for (int t = 0; t < nt; ++t) {
            block_waiters += blocks[j].fibers[t].state == State::kWaitBlock;
            warp_waiters += blocks[j].fibers[t].state == State::kWaitWarp;
            shuffle_waiters += blocks[j].fibers[t].state == State::kWaitShuffle;
            returned += blocks[j].fibers[t].state == State::kDone;
          }
          if (returned == nt) continue;
          const dim3 bi = blocks[j].index;
          fail("deadlock in block (%u,%u,%u): %d threads wait at __syncthreads, %d at __syncwarp, "
               "%d at a shuffle, %d have returned", bi.x, bi.y, bi.z, block_waiters, warp_waiters,
               shuffle_waiters, returned);
        }
      }
    }
    for (int j = 0; j < ng; ++j) tsan_acquire(&blocks[j].block_sync);
  }
  if (std::getenv("SIMT_VERBOSE")) {
    std::fprintf(stderr, "simt: launch <<<(%u,%u,%u), %d, %zu>>> (%d blocks at a time) took %.3f s\n",
                 grid.x, grid.y, grid.z, nt, smem_bytes, group,
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  for (int j = 0; j < group; ++j) {
    for (int t = 0; t < nt; ++t) {
#if SIMT_TSAN
      __tsan_destroy_fiber(blocks[j].fibers[t].tsan);
#endif
      delete[] blocks[j].fibers[t].stack;
    }
    std::free(blocks[j].smem);
    std::free(blocks[j].static_smem);
    delete[] blocks[j].fibers;
    delete[] blocks[j].warps;
  }
  g_block = nullptr;
  delete[] blocks;
}

}  // namespace simt

// ---------------------------------------------------------------------------------------------
// Device functions
// ---------------------------------------------------------------------------------------------

#define threadIdx (::simt::thread_index())
#define blockIdx (::simt::block_index())

inline void __syncthreads() { simt::syncthreads(); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) simt::fail("__syncwarp: only the full mask is emulated, got %#x", mask);
  simt::syncwarp();
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a register");
  if (mask != 0xffffffffu || width != 32) {
    simt::fail("__shfl_xor_sync: only the full mask and width 32 are emulated");
  }
  if (simt::warp_size_now() != 32) {
    simt::fail("__shfl_xor_sync: a lane of warp %d has returned (undefined on a GPU)",
               simt::thread_id() >> 5);
  }
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = simt::shuffle(bits, simt::lane_id() ^ lane_mask);
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}

inline float atomicAdd(float* address, float v) {
  return std::atomic_ref<float>(*address).fetch_add(v, std::memory_order_relaxed);
}

#define CUDA_KERNEL_ASSERT(cond)                                                               \
  do {                                                                                         \
    if (!(cond)) simt::fail("device assertion failed: %s (%s:%d)", #cond, __FILE__, __LINE__); \
  } while (0)

// ---------------------------------------------------------------------------------------------
// WMMA: m16n16k16, float16/bfloat16 inputs, float accumulators
// ---------------------------------------------------------------------------------------------

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "only the m16n16k16 shape is emulated");
  static constexpr bool kAcc = std::is_same<Use, accumulator>::value;
  static_assert(kAcc ? std::is_same<T, float>::value
                     : (std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value),
                "matrix_a/b fragments of half or bfloat16, float accumulators");
  // matrix_a/b: the whole 16 x 16 tile, row-major; accumulator: this lane's 8 elements
  // (tile elements lane*8 .. lane*8+7, row-major).
  float x[kAcc ? 8 : 256];
};

namespace detail {

inline float to_f(float v) { return v; }
inline float to_f(__half v) { return __half2float(v); }
inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

// The rules of the CUDA programming guide for load/store_matrix_sync, and bounds when the tile
// lies in dynamic shared memory.
template <typename T>
inline void check_tile(const T* p, unsigned ldm, const char* fn) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(p);
  if (addr % 32 != 0) simt::fail("%s: pointer %p is not 256-bit (32-byte) aligned", fn, (void*)p);
  if ((ldm * sizeof(T)) % 16 != 0) {
    simt::fail("%s: ldm %u is not a multiple of 16 bytes (%zu elements)", fn, ldm, 16 / sizeof(T));
  }
  if (ldm < 16) simt::fail("%s: ldm %u is less than the tile's 16 columns", fn, ldm);
  const simt::Block* b = simt::block();
  const uintptr_t lo = reinterpret_cast<uintptr_t>(b->smem);
  if (addr >= lo && addr < lo + b->smem_bytes) {
    const uintptr_t end = addr + (15 * static_cast<uintptr_t>(ldm) + 16) * sizeof(T);
    if (end > lo + b->smem_bytes) {
      simt::fail("%s: the 16 x %u tile at shared offset %zu ends %zu bytes past the %zu bytes of "
                 "dynamic shared memory", fn, ldm, size_t(addr - lo), size_t(end - lo - b->smem_bytes),
                 b->smem_bytes);
    }
  }
}

}  // namespace detail

template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulators take a layout_t");
  detail::check_tile(p, ldm, "load_matrix_sync");
  constexpr bool row = std::is_same<Layout, row_major>::value;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.x[i * 16 + j] = detail::to_f(row ? p[i * ldm + j] : p[j * ldm + i]);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p,
                             unsigned ldm, layout_t layout) {
  detail::check_tile(p, ldm, "load_matrix_sync");
  const int lane = simt::lane_id();
  for (int t = 0; t < 8; ++t) {
    const int e = lane * 8 + t, i = e / 16, j = e % 16;
    f.x[t] = layout == mem_row_major ? p[i * ldm + j] : p[j * ldm + i];
  }
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ldm, layout_t layout) {
  detail::check_tile(p, ldm, "store_matrix_sync");
  const int lane = simt::lane_id();
  for (int t = 0; t < 8; ++t) {
    const int e = lane * 8 + t, i = e / 16, j = e % 16;
    (layout == mem_row_major ? p[i * ldm + j] : p[j * ldm + i]) = f.x[t];
  }
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float v) {
  for (float& e : f.x) e = v;
}

// d = a @ b + c for this lane's 8 accumulator elements (d may be c).
template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
                     const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  const int lane = simt::lane_id();
  float out[8];
  for (int t = 0; t < 8; ++t) {
    const int e = lane * 8 + t, i = e / 16, j = e % 16;
    float acc = c.x[t];
    for (int k = 0; k < 16; ++k) acc += a.x[i * 16 + k] * b.x[k * 16 + j];
    out[t] = acc;
  }
  for (int t = 0; t < 8; ++t) d.x[t] = out[t];
}

}  // namespace wmma
}  // namespace nvcuda
