// The probes of sanitizer_probes.h, written as CUDA device code on the emulation runtime.
#include "runtime.h"  // first: the device code below compiles against it

#include <ATen/Functions.h>
#include <c10/util/Exception.h>

#include <string>

#include "../cuda/gol_kernels.cuh"
#include "sanitizer_probes.h"

namespace gk {
namespace cuda {
namespace {

// block_sum of gol_kernels.cuh, with its barriers optional: without them a thread reads its
// partner's shared slot with no happens-before edge to the partner's write.
__global__ void probe_block_sum_kernel(const float* __restrict__ in, float* __restrict__ out,
                                       bool with_barriers) {
  __shared__ float shared[kThreads];
  shared[threadIdx.x] = in[threadIdx.x];
  if (with_barriers) __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    if (with_barriers) __syncthreads();
  }
  if (threadIdx.x == 0) *out = shared[0];
}

// out[i] = in[i + shift]: shift 1 reads in[n], one element past the end.
__global__ void probe_shifted_copy_kernel(const float* __restrict__ in, float* __restrict__ out,
                                          int64_t n, int64_t shift) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) out[i] = in[i + shift];
}

// The float32 kernel's 128-bit chunk load at in + offset: offset 1 is 4-byte aligned only.
__global__ void probe_vector_load_kernel(const float* __restrict__ in, float* __restrict__ out,
                                         int64_t offset) {
  if (threadIdx.x != 0) return;
  const Chunk<float> chunk = *reinterpret_cast<const Chunk<float>*>(in + offset);
  *out = chunk.v[0] + chunk.v[1] + chunk.v[2] + chunk.v[3];
}

}  // namespace

double sanitizer_probe(c10::string_view bug) {
  const std::string name(bug);
  TORCH_CHECK_VALUE(name == "none" || name == "missing_barrier" || name == "out_of_bounds" ||
                        name == "misaligned_vector_load",
                    "sanitizer_probe: bug must be 'none', 'missing_barrier', 'out_of_bounds' or "
                    "'misaligned_vector_load', got '", name, "'");
  // Tensors from torch's allocator: the sanitizers must see the memory the real kernels touch.
  const at::Tensor in = at::arange(kThreads, at::kFloat);
  at::Tensor out = at::zeros({kThreads}, at::kFloat);
  const float* x = in.data_ptr<float>();
  float* y = out.data_ptr<float>();
  double total = 0.0;

  emu::launch(probe_block_sum_kernel, dim3(1), dim3(kThreads), 0, x, y,
              /*with_barriers=*/name != "missing_barrier");
  total += y[0];
  emu::launch(probe_shifted_copy_kernel, dim3(1), dim3(kThreads), 0, x, y,
              static_cast<int64_t>(kThreads), static_cast<int64_t>(name == "out_of_bounds"));
  total += out.sum().item<double>();
  emu::launch(probe_vector_load_kernel, dim3(1), dim3(kThreads), 0, x, y,
              static_cast<int64_t>(name == "misaligned_vector_load" ? 1 : 4));
  total += y[0];
  return total;
}

}  // namespace cuda
}  // namespace gk
