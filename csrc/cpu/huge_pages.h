// Large CPU outputs backed by transparent huge pages, with the last freed one kept for reuse.
//
// The gradient the fused loss returns is the one N x C buffer it allocates; filling freshly
// mapped 4 KiB pages costs one page fault each, which on these machines takes longer than the
// loss math of a whole row block (an 8192 x 1203 float gradient: ~10k faults, ~15 ms). Aligning
// the buffer to 2 MiB and advising MADV_HUGEPAGE cuts that to a few dozen faults, but the kernel
// still zeroes every fresh page (~20% of the op's time). A training loop frees and allocates a
// gradient of the same size every step, so one freed buffer is kept and handed out again, the
// way torch's CUDA caching allocator keeps device memory: it stays mapped, is never zeroed
// again, and its faults are paid once. GUMBEL_CPU_BUFFER_CACHE=0 turns the reuse off. The
// profiler (memory profiles, benchmarks) sees a buffer only while a tensor uses it.
// Elsewhere (non-Linux, small tensors) this is at::empty.
#pragma once

#include <ATen/Functions.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Allocator.h>

#include <cstdlib>
#include <cstring>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace gk {
namespace cpu {

// One parked buffer; freed for good when a buffer of another size is returned (or at exit).
class HugePageBufferCache {
 public:
  static HugePageBufferCache& instance() {
    static HugePageBufferCache* cache = new HugePageBufferCache();  // never destroyed: buffers
    return *cache;                                                 // may be freed at exit
  }

  // A parked buffer of exactly `bytes`, or nullptr.
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (data_ == nullptr || size_ != bytes) return nullptr;
    void* data = data_;
    data_ = nullptr;
    return data;
  }

  void give(void* data, size_t bytes) {
    void* evicted = data;
    if (enabled_) {
      std::lock_guard<std::mutex> lock(mutex_);
      std::swap(evicted, data_);
      size_ = bytes;
    }
    std::free(evicted);
  }

 private:
  HugePageBufferCache() {
    const char* env = std::getenv("GUMBEL_CPU_BUFFER_CACHE");
    enabled_ = env == nullptr || std::strcmp(env, "0") != 0;
  }
  std::mutex mutex_;
  void* data_ = nullptr;
  size_t size_ = 0;
  bool enabled_ = true;
};

inline at::Tensor empty_huge_page_backed(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHugePage = size_t(2) << 20;
  size_t numel = 1;
  for (const int64_t s : sizes) numel *= static_cast<size_t>(s);
  const size_t bytes = numel * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (bytes >= 2 * kHugePage) {
    const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* data = HugePageBufferCache::instance().take(rounded);
    if (data == nullptr && posix_memalign(&data, kHugePage, rounded) == 0) {
      madvise(data, rounded, MADV_HUGEPAGE);  // advice only: failure just means 4 KiB pages
    }
    if (data != nullptr) {
      // Outside torch's allocator, so tell the profiler ourselves.
      const c10::Device cpu(c10::DeviceType::CPU);
      const int64_t size = static_cast<int64_t>(rounded);
      c10::reportMemoryUsageToProfiler(data, size, 0, 0, cpu);
      return at::from_blob(
          data, sizes,
          [size, cpu](void* p) {
            c10::reportMemoryUsageToProfiler(p, -size, 0, 0, cpu);
            HugePageBufferCache::instance().give(p, static_cast<size_t>(size));
          },
          options);
    }
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace cpu
}  // namespace gk
