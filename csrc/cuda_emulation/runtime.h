// A CUDA runtime emulated on the CPU, just enough for csrc/cuda/gol_kernels.cuh: include this
// header before the device code and it compiles as host C++.
//
// - The qualifiers (__device__, __host__, __forceinline__, __launch_bounds__) are defined away,
//   __global__ becomes inline; __restrict__ is a GCC/Clang keyword already.
// - Every CUDA thread of a block is an OS thread with its own threadIdx/blockIdx/blockDim/
//   gridDim; blocks run one at a time (all threads of a block finish before the next starts),
//   so inter-block races cannot show here: the kernels are designed to have none.
// - __syncthreads() is a barrier across the block's threads (std::barrier); a thread that has
//   returned from the kernel counts as arrived, as on the GPU.
// - __shared__ variables are function-local statics: one copy per kernel instantiation, which
//   is the block's shared memory since blocks do not overlap (launches are serialised).
// - Atomics are std::atomic_ref operations (sequentially consistent); there are no float
//   atomics, on purpose: the kernels must not use them (SPEC.md section 7).
// - __half and __nv_bfloat16 are 16-bit structs with CUDA's round-to-nearest-even conversions;
//   the math functions are the host's libm (CUDA's expf is within 2 ulp of it).
// Warp-level primitives are not modelled: device code that uses them must add them here first.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#if defined(__CUDACC__)
#error "csrc/cuda_emulation/runtime.h is for host compilers: nvcc has the real runtime"
#endif

#define __global__ inline  // kernels are then ODR-safe in several translation units
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
      : x(x_), y(y_), z(z_) {}
};

// The built-in variables, per emulated thread.
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};

namespace gk {
namespace emu {

// Waits until every live thread of the current block has arrived (run_grid sets it up).
void sync_block_threads();

// Runs `body` once per (block, thread) of the launch: blockDim threads, each walking the blocks
// in order, with all of a block's threads done before any thread starts the next block.
// Launches are serialised process-wide. Throws std::invalid_argument for a configuration CUDA
// would refuse (empty grid or block, more than 1024 threads per block).
void run_grid(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body);

// <<<grid, block, shared_bytes>>>: the arguments are copied once at the launch, as CUDA does,
// and every thread calls the kernel with those copies.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
            Args&&... args) {
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  run_grid(grid, block, shared_bytes, [&] { std::apply(kernel, params); });
}

}  // namespace emu
}  // namespace gk

inline void __syncthreads() { gk::emu::sync_block_threads(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
T __ldg(const T* address) {
  return *address;
}

inline unsigned int __umulhi(unsigned int a, unsigned int b) {
  return static_cast<unsigned int>((static_cast<unsigned long long>(a) * b) >> 32);
}

// Integer atomics: they return the old value, as CUDA's do.
template <typename T>
T atomicAdd(T* address, T value) {
  static_assert(std::is_integral_v<T>, "no float atomics: sums must be fixed-order");
  return std::atomic_ref<T>(*address).fetch_add(value);
}

template <typename T>
T atomicMax(T* address, T value) {
  static_assert(std::is_integral_v<T>, "integer atomics only");
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (value > old && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}

// ---------------------------------------------------------------------------------------------
// 16-bit floating types with CUDA's conversions (round to nearest even).
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  _Float16 value;
  std::memcpy(&value, &h.bits, sizeof(value));
  return static_cast<float>(value);
}

inline __half __float2half_rn(float x) {
  const _Float16 value = static_cast<_Float16>(x);  // IEEE round to nearest even
  __half h;
  std::memcpy(&h.bits, &value, sizeof(value));
  return h;
}

inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t bits = static_cast<uint32_t>(b.bits) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fff};  // CUDA's NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest, ties to even
  return __nv_bfloat16{static_cast<uint16_t>(bits >> 16)};
}
