// The host side of the CUDA kernels (csrc/cuda/gol_kernels.cuh): argument checks, outputs,
// grid sizes, the choice of the vector path, the launches in order, and the host label check.
//
// Written once against a small launch interface, `Runtime`, so that the same logic drives the
// GPU (CudaRuntime, csrc/cuda/gol_loss_kernel.cu) and the emulator that runs the device code on
// the CPU (EmulatedRuntime, csrc/cuda_emulation/gol_emulated_ops.cpp). A Runtime provides:
//   Runtime(const at::Tensor& t)      current device/stream of the tensor's device (a guard)
//   launch(kernel, Launch, args...)   one launch of a __global__ function on that stream
//   int64_t grid_limit()              most blocks of a grid-stride launch
//   bool host_sync_allowed()          false while a CUDA graph is being captured
//   auto relaxed_capture_guard()      an object that keeps a host sync from breaking another
//                                     thread's capture while it lives
// The 16-bit types __half and __nv_bfloat16 must be declared before this header.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>

#include "../gol_checks.h"
#include "gol_kernels.cuh"

namespace gk {
namespace cuda {

struct Launch {
  int64_t grid;
  int block;
  size_t shared_bytes;
};

// The element type the device code sees for an ATen scalar type (same size and bits).
template <typename T>
struct DeviceScalar {
  using type = T;
};
template <>
struct DeviceScalar<at::Half> {
  using type = __half;
};
template <>
struct DeviceScalar<at::BFloat16> {
  using type = __nv_bfloat16;
};
template <typename T>
using device_scalar_t = typename DeviceScalar<T>::type;
static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2, "16-bit element types");

template <typename T>
T* device_ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

// Labels are validated on the host by default: one 8-byte device-to-host copy queued after the
// fused pass, which waits for it. GUMBEL_CUDA_CHECK_LABELS=0 skips it, and so does a CUDA graph
// capture (no host sync is allowed there): then a row with a bad label gets NaN loss and
// gradient instead of an exception; nothing is read out of bounds either way.
inline bool check_labels_on_host() {
  const char* value = std::getenv("GUMBEL_CUDA_CHECK_LABELS");
  return value == nullptr || std::strcmp(value, "0") != 0;
}

// A grid-stride launch over `work_items` threads' worth of work: one thread per item up to the
// runtime's grid limit. The GPU's limit is a constant, not a function of the SM count, so the
// number of loss partials, and with it the loss bits, is the same on every GPU.
template <class Runtime>
int64_t grid_size(Runtime& rt, int64_t work_items) {
  const int64_t blocks = (work_items + kThreads - 1) / kThreads;
  return std::max<int64_t>(1, std::min<int64_t>(blocks, rt.grid_limit()));
}

// The seed as the kernels take it: a CPU seed by value (in the Philox key of the params), a seed
// on the logits' device through a pointer the kernel reads (no host sync; under CUDA-graph
// capture a seed drawn on the device is drawn anew by every replay). The emulator's "device"
// is the CPU, so it always takes the pointer.
inline const int64_t* device_seed_ptr(const GolInputs& in) {
  return in.seed.device() == in.logits.device() ? in.seed.data_ptr<int64_t>() : nullptr;
}

// The labels pre-pass (count_labels_kernel) into a fresh 4 x int64 workspace (a LabelCounts).
template <class Runtime>
at::Tensor launch_count_labels(Runtime& rt, const GolInputs& in) {
  at::Tensor workspace = at::empty({4}, in.labels.options());
  const GolParams& p = in.params;
  rt.launch(count_labels_kernel, Launch{1, kThreads, 0}, in.labels.data_ptr<int64_t>(),
            device_ptr<const bool>(in.drop_classes), p.num_rows, p.num_classes, p.ignore_index,
            reinterpret_cast<LabelCounts*>(workspace.data_ptr<int64_t>()));
  return workspace;
}

// Called after the launches so that the copy overlaps the fused pass.
template <class Runtime>
void raise_on_bad_label(Runtime& rt, const GolInputs& in, const at::Tensor& workspace) {
  if (!check_labels_on_host() || !rt.host_sync_allowed()) return;
  const auto relaxed = rt.relaxed_capture_guard();
  const int64_t first_bad = workspace[3].item<int64_t>();
  if (first_bad != kNoBadLabel) {
    const GolParams& p = in.params;
    const int64_t value = in.labels[first_bad].item<int64_t>();
    TORCH_CHECK_VALUE(false, "gol_loss: labels[", first_bad, "] = ", value,
                      " is out of range: expected a class in [0, ", p.num_classes - 1, "], ",
                      p.num_classes, " for background, or ignore_index=", p.ignore_index);
  }
}

template <class Runtime>
std::tuple<at::Tensor, at::Tensor> gol_loss(
    const at::Tensor& logits, const at::Tensor& labels,
    const std::optional<at::Tensor>& drop_classes, const std::optional<at::Tensor>& class_weight,
    const std::optional<at::Tensor>& row_weight, const at::Tensor& seed, int64_t offset,
    c10::string_view mode, c10::string_view activation, c10::string_view reduction,
    std::optional<double> clamp_min, std::optional<double> clamp_max, c10::string_view grad_mode,
    int64_t ignore_index, bool need_grad) {
  const GolInputs in = prepare_gol_inputs(logits, labels, drop_classes, class_weight, row_weight,
                                          seed, offset, mode, activation, reduction, clamp_min,
                                          clamp_max, grad_mode, ignore_index, need_grad);
  Runtime rt(in.logits);
  at::Tensor loss = allocate_loss(in);
  at::Tensor grad = allocate_grad(in);
  const GolParams& p = in.params;
  if (p.num_rows == 0) {
    loss.zero_();
    return {loss, grad};
  }
  const at::Tensor workspace = launch_count_labels(rt, in);
  auto* counts = reinterpret_cast<const LabelCounts*>(workspace.data_ptr<int64_t>());
  const int64_t total = p.num_rows * p.num_classes;
  const int64_t blocks = grid_size(rt, (total + kChunk - 1) / kChunk);
  at::Tensor partials = at::empty({blocks}, in.logits.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.logits.scalar_type(), "gol_loss_cuda", [&] {
    using dev_t = device_scalar_t<scalar_t>;
    using math_t = math_type_t<dev_t>;
    const dev_t* q = device_ptr<const dev_t>(in.logits);
    dev_t* g = p.need_grad ? device_ptr<dev_t>(grad) : nullptr;
    dev_t* l = p.reduction == Reduction::kNone ? device_ptr<dev_t>(loss) : nullptr;
    // The vector path needs every N x C pointer aligned to a whole chunk (a storage offset can
    // break that): else the scalar loads and stores.
    constexpr uintptr_t kAlign = sizeof(Chunk<dev_t>);
    const bool aligned = reinterpret_cast<uintptr_t>(q) % kAlign == 0 &&
                         reinterpret_cast<uintptr_t>(g) % kAlign == 0 &&
                         reinterpret_cast<uintptr_t>(l) % kAlign == 0;
    const auto kernel = aligned ? gol_loss_kernel<dev_t, true> : gol_loss_kernel<dev_t, false>;
    rt.launch(kernel, Launch{blocks, kThreads, 0}, q, in.labels.data_ptr<int64_t>(),
              device_ptr<const bool>(in.drop_classes), device_ptr<const math_t>(in.class_weight),
              device_ptr<const math_t>(in.row_weight), counts, device_seed_ptr(in), p, g, l,
              partials.data_ptr<double>());
    if (p.reduction != Reduction::kNone) {
      rt.launch(sum_partials_kernel<math_t>, Launch{1, kThreads, 0},
                partials.data_ptr<double>(), blocks, counts, p.reduction == Reduction::kMean,
                loss.data_ptr<math_t>());
    }
  });
  raise_on_bad_label(rt, in, workspace);
  return {loss, grad};
}

template <class Runtime>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gol_loss_class_stats(
    const at::Tensor& logits, const at::Tensor& labels,
    const std::optional<at::Tensor>& drop_classes, const std::optional<at::Tensor>& class_weight,
    const std::optional<at::Tensor>& pos_weight, const std::optional<at::Tensor>& row_weight,
    const at::Tensor& seed, int64_t offset, c10::string_view mode, c10::string_view activation,
    c10::string_view reduction, std::optional<double> clamp_min, std::optional<double> clamp_max,
    c10::string_view grad_mode, int64_t ignore_index) {
  const GolInputs in = prepare_class_stats_inputs(
      logits, labels, drop_classes, class_weight, pos_weight, row_weight, seed, offset, mode,
      activation, reduction, clamp_min, clamp_max, grad_mode, ignore_index);
  Runtime rt(in.logits);
  at::Tensor loss = allocate_loss(in);
  at::Tensor grad = allocate_grad(in);
  at::Tensor pos_stats = allocate_class_stat(in);
  at::Tensor neg_stats = allocate_class_stat(in);
  const GolParams& p = in.params;
  if (p.num_rows == 0) {
    loss.zero_();
    return {loss, grad, pos_stats, neg_stats};
  }
  const at::Tensor workspace = launch_count_labels(rt, in);
  auto* counts = reinterpret_cast<const LabelCounts*>(workspace.data_ptr<int64_t>());
  const int64_t blocks = (p.num_rows + kStatsRows - 1) / kStatsRows;
  at::Tensor loss_partials = at::empty({blocks}, in.logits.options().dtype(at::kDouble));
  at::Tensor stat_partials =
      at::empty({blocks, 2, p.num_classes}, in.logits.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.logits.scalar_type(), "gol_loss_class_stats_cuda", [&] {
    using dev_t = device_scalar_t<scalar_t>;
    using math_t = math_type_t<dev_t>;
    rt.launch(gol_loss_class_stats_kernel<dev_t>, Launch{blocks, kThreads, 0},
              device_ptr<const dev_t>(in.logits), in.labels.data_ptr<int64_t>(),
              device_ptr<const bool>(in.drop_classes), device_ptr<const math_t>(in.class_weight),
              device_ptr<const math_t>(in.pos_weight), device_ptr<const math_t>(in.row_weight),
              counts, device_seed_ptr(in), p, device_ptr<dev_t>(grad),
              loss_partials.data_ptr<double>(), stat_partials.data_ptr<double>());
    rt.launch(sum_partials_kernel<math_t>, Launch{1, kThreads, 0},
              loss_partials.data_ptr<double>(), blocks, counts, p.reduction == Reduction::kMean,
              loss.data_ptr<math_t>());
  });
  rt.launch(sum_class_stats_kernel, Launch{(p.num_classes + kThreads - 1) / kThreads, kThreads, 0},
            stat_partials.data_ptr<double>(), blocks, p.num_classes, pos_stats.data_ptr<double>(),
            neg_stats.data_ptr<double>());
  raise_on_bad_label(rt, in, workspace);
  return {loss, grad, pos_stats, neg_stats};
}

template <class Runtime>
at::Tensor gumbel_activation(const at::Tensor& logits) {
  TORCH_CHECK_TYPE(at::isFloatingType(logits.scalar_type()),
                   "gumbel_activation: logits must be a floating tensor, got ", logits.scalar_type());
  const at::Tensor x = logits.contiguous();
  Runtime rt(x);
  at::Tensor out = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gumbel_activation_cuda", [&] {
    using dev_t = device_scalar_t<scalar_t>;
    rt.launch(gumbel_activation_kernel<dev_t>, Launch{grid_size(rt, n), kThreads, 0},
              device_ptr<const dev_t>(x), device_ptr<dev_t>(out), n);
  });
  return out;
}

// The backward of the fused loss: grad *= grad_output in place. A scalar upstream gradient is
// applied by scale_grad_kernel, which skips the pass on the device when it is 1 (no host sync).
template <class Runtime>
void scale_grad(at::Tensor& grad, const at::Tensor& grad_output) {
  Runtime rt(grad);
  if (grad_output.numel() != 1) {
    TORCH_CHECK_VALUE(grad_output.sizes() == grad.sizes(), "scale_grad_: grad_output has shape ",
                      shape_of(grad_output), " but the saved gradient has shape ", shape_of(grad));
    grad.mul_(grad_output);
    return;
  }
  TORCH_CHECK_VALUE(grad.is_contiguous(), "scale_grad_: the saved gradient must be contiguous");
  TORCH_CHECK_VALUE(grad_output.device() == grad.device(), "scale_grad_: grad_output is on ",
                    grad_output.device(), " but the gradient is on ", grad.device());
  const int64_t n = grad.numel();
  if (n == 0) return;
  const at::Tensor scale = grad_output.reshape({}).to(at::kDouble);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "scale_grad_cuda", [&] {
    using dev_t = device_scalar_t<scalar_t>;
    rt.launch(scale_grad_kernel<dev_t>, Launch{grid_size(rt, n), kThreads, 0},
              device_ptr<dev_t>(grad), scale.data_ptr<double>(), n);
  });
}

// The four ops on one dispatch key (CUDA for the GPU, CPU for the emulator's library).
template <class Runtime>
void register_kernels(torch::Library& m) {
  m.impl("gol_loss", &gol_loss<Runtime>);
  m.impl("gol_loss_class_stats", &gol_loss_class_stats<Runtime>);
  m.impl("gumbel_activation", &gumbel_activation<Runtime>);
  m.impl("scale_grad_", &scale_grad<Runtime>);
}

}  // namespace cuda
}  // namespace gk
