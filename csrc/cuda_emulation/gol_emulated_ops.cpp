// The `gumbel_emulated` operator library: the CUDA backend's device code
// (csrc/cuda/gol_kernels.cuh) and host logic (csrc/cuda/gol_host.h), unchanged, run on CPU
// tensors through the emulation runtime (runtime.h). A test backend ("cuda_emulated" in
// gumbel_kernels.backends, never chosen by "auto"): it lets every CI run execute the GPU code
// against the reference, also under AddressSanitizer/UBSan and ThreadSanitizer (CMakeLists.txt).
//
// Knobs (read on every call):
//   GUMBEL_EMULATED_GRID_LIMIT  most blocks of a grid-stride launch (default 3, a tiny GPU, so
//                               that the grid-stride loops iterate on small test shapes)
// and the op gumbel_emulated::emulate_capture(bool), which makes host_sync_allowed() false as
// a CUDA-graph capture would (the host label check is then skipped, bad rows become NaN).
#include "runtime.h"  // first: the device code below compiles against it

#include <atomic>
#include <cstdlib>
#include <string>

#include "../cuda/gol_host.h"
#include "../gol_schemas.h"
#include "sanitizer_probes.h"

namespace gk {
namespace cuda {
namespace {

std::atomic<bool> emulated_capture{false};

bool emulate_capture(bool capturing) { return emulated_capture.exchange(capturing); }

int64_t emulated_grid_limit() {
  const char* value = std::getenv("GUMBEL_EMULATED_GRID_LIMIT");
  if (value == nullptr || *value == '\0') return 3;
  char* end = nullptr;
  const long long limit = std::strtoll(value, &end, 10);
  TORCH_CHECK_VALUE(end != value && *end == '\0' && limit >= 1 && limit <= (1LL << 31) - 1,
                    "GUMBEL_EMULATED_GRID_LIMIT must be an integer in [1, 2^31), got '", value,
                    "'");
  return limit;
}

class EmulatedRuntime {
 public:
  explicit EmulatedRuntime(const at::Tensor& tensor) {
    TORCH_CHECK_VALUE(tensor.device().is_cpu(),
                      "the emulated CUDA backend runs on CPU tensors, got a tensor on ",
                      tensor.device());
  }

  template <typename... Params, typename... Args>
  void launch(void (*kernel)(Params...), const Launch& launch, Args&&... args) {
    TORCH_CHECK(launch.grid >= 1 && launch.grid <= (1LL << 31) - 1,
                "emulated CUDA launch: grid of ", launch.grid, " blocks");
    emu::launch(kernel, dim3(static_cast<unsigned>(launch.grid)), dim3(launch.block),
                launch.shared_bytes, std::forward<Args>(args)...);
  }

  int64_t grid_limit() const { return emulated_grid_limit(); }

  bool host_sync_allowed() const { return !emulated_capture.load(); }

  struct NoCaptureModeChange {};
  NoCaptureModeChange relaxed_capture_guard() const { return {}; }
};

}  // namespace
}  // namespace cuda
}  // namespace gk

TORCH_LIBRARY(gumbel_emulated, m) {
  gk::define_gol_schemas(m);
  // Test hooks of the emulator (no tensors: one kernel for every dispatch key).
  m.def("emulate_capture(bool capturing) -> bool", &gk::cuda::emulate_capture);
  m.def("sanitizer_probe(str bug) -> float", &gk::cuda::sanitizer_probe);
}

TORCH_LIBRARY_IMPL(gumbel_emulated, CPU, m) {
  gk::cuda::register_kernels<gk::cuda::EmulatedRuntime>(m);
}
