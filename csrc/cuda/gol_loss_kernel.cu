// The CUDA backend of gumbel::gol_loss, gol_loss_class_stats, gumbel_activation and scale_grad_:
// the GPU's Runtime for the shared host logic of csrc/cuda/gol_host.h, which launches the
// device code of csrc/cuda/gol_kernels.cuh on the current stream.
//
// A gol_loss call is three launches (a memset of the small header, the per-row/per-column
// prepare kernel, the fused pass with its last-block final sum) and, by default, one host sync:
// the label check's 8-byte copy (gol_host.h, raise_on_bad_label), skipped under CUDA-graph
// capture and with GUMBEL_CUDA_CHECK_LABELS=0.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <string>
#include <utility>

#include "gol_host.h"

namespace gk {
namespace cuda {
namespace {

// Blocks of a grid-stride launch: about 8 resident 256-thread blocks per SM of an H100 (132
// SMs), fixed for every device so that the loss's partials do not depend on the SM count.
constexpr int64_t kGpuGridLimit = 1024;

class CudaRuntime {
 public:
  explicit CudaRuntime(const at::Tensor& tensor)
      : guard_(tensor.device()), stream_(c10::cuda::getCurrentCUDAStream()) {}

  template <typename... Params, typename... Args>
  void launch(void (*kernel)(Params...), const Launch& launch, Args&&... args) {
    kernel<<<dim3(static_cast<unsigned>(launch.grid)), dim3(launch.block), launch.shared_bytes,
             stream_>>>(std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  int64_t grid_limit() const { return kGpuGridLimit; }

  // No host sync while this stream is capturing, nor while any blocking stream of the device
  // is (the legacy stream then reports an implicit dependency on the capture).
  bool host_sync_allowed() const {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream_, &status));
    if (status != cudaStreamCaptureStatusNone) return false;
    const cudaError_t legacy = cudaStreamIsCapturing(cudaStreamLegacy, &status);
    if (legacy == cudaErrorStreamCaptureImplicit) {
      (void)cudaGetLastError();  // the probe's answer, not a failure
      return false;
    }
    C10_CUDA_CHECK(legacy);
    return status == cudaStreamCaptureStatusNone;
  }

  // The sync of the label check runs in relaxed capture mode: a capture that another thread
  // began (non-blocking streams, which the probe above cannot see) is not invalidated by it.
  c10::cuda::CUDAStreamCaptureModeGuard relaxed_capture_guard() const {
    return c10::cuda::CUDAStreamCaptureModeGuard(cudaStreamCaptureModeRelaxed);
  }

  // Whether this build has an image (SASS for the device's arch, or PTX it can JIT) for the
  // current device: "" if so, else the reason ("auto" then falls back to Triton).
  static std::string missing_image_reason() {
    cudaFuncAttributes attributes;
    const cudaError_t status = cudaFuncGetAttributes(&attributes, sum_class_stats_kernel);
    if (status == cudaSuccess) return "";
    (void)cudaGetLastError();
    return cudaGetErrorString(status);
  }

 private:
  c10::cuda::CUDAGuard guard_;
  cudaStream_t stream_;
};

std::string cuda_kernel_image_check(int64_t device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  return CudaRuntime::missing_image_reason();
}

}  // namespace
}  // namespace cuda
}  // namespace gk

TORCH_LIBRARY_IMPL(gumbel, CUDA, m) { gk::cuda::register_kernels<gk::cuda::CudaRuntime>(m); }

// Device-independent (no tensor argument): registered for every dispatch key.
TORCH_LIBRARY_FRAGMENT(gumbel, m) {
  m.def("cuda_kernel_image_check(int device) -> str", &gk::cuda::cuda_kernel_image_check);
}
