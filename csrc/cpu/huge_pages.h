// Large CPU outputs backed by transparent huge pages.
//
// The gradient the fused loss returns is the one N x C buffer it allocates; filling freshly
// mapped 4 KiB pages costs one page fault each, which on these machines takes longer than the
// loss math of a whole row block (an 8192 x 1203 float gradient: ~10k faults, ~15 ms). Aligning
// the buffer to 2 MiB and advising MADV_HUGEPAGE cuts that to a few dozen faults. Elsewhere
// (non-Linux, small tensors) this is at::empty.
#pragma once

#include <ATen/Functions.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Allocator.h>

#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace gk {
namespace cpu {

inline at::Tensor empty_huge_page_backed(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHugePage = size_t(2) << 20;
  size_t numel = 1;
  for (const int64_t s : sizes) numel *= static_cast<size_t>(s);
  const size_t bytes = numel * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (bytes >= 2 * kHugePage) {
    const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* data = nullptr;
    if (posix_memalign(&data, kHugePage, rounded) == 0) {
      madvise(data, rounded, MADV_HUGEPAGE);  // advice only: failure just means 4 KiB pages
      // Outside torch's allocator, so tell the profiler (memory profiles, benchmarks) ourselves.
      const c10::Device cpu(c10::DeviceType::CPU);
      const int64_t size = static_cast<int64_t>(rounded);
      c10::reportMemoryUsageToProfiler(data, size, 0, 0, cpu);
      return at::from_blob(
          data, sizes,
          [size, cpu](void* p) {
            c10::reportMemoryUsageToProfiler(p, -size, 0, 0, cpu);
            std::free(p);
          },
          options);
    }
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace cpu
}  // namespace gk
