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

// What prepare_kernel writes for a call: the zeroed header (label statistics, ticket), one
// RowFact per row and the C drop flags.
struct Prepared {
  at::Tensor header, rows, drop_flags;
  const CallHeader* header_ptr() const {
    return reinterpret_cast<const CallHeader*>(header.data_ptr());
  }
};

template <class Runtime>
Prepared launch_prepare(Runtime& rt, const GolInputs& in) {
  const GolParams& p = in.params;
  const auto bytes = in.logits.options().dtype(at::kByte);
  static_assert(sizeof(CallHeader) % sizeof(int64_t) == 0, "CallHeader is whole int64 words");
  Prepared out;
  out.header = at::zeros({static_cast<int64_t>(sizeof(CallHeader))}, bytes);
  out.drop_flags = at::empty({p.num_classes}, bytes);
  AT_DISPATCH_FLOATING_TYPES(in.logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat,
                             "gol_prepare", [&] {
    out.rows = at::empty({p.num_rows * static_cast<int64_t>(sizeof(RowFact<scalar_t>))}, bytes);
    rt.launch(prepare_kernel<scalar_t>,
              Launch{grid_size(rt, p.num_rows + p.num_classes), kThreads, 0},
              in.labels.data_ptr<int64_t>(), device_ptr<const bool>(in.drop_classes),
              device_ptr<const scalar_t>(in.row_weight), p.num_rows, p.num_classes,
              p.ignore_index, device_ptr<RowFact<scalar_t>>(out.rows),
              device_ptr<uint8_t>(out.drop_flags), device_ptr<CallHeader>(out.header));
  });
  return out;
}

// Called after the launches so that the copy overlaps the fused pass.
template <class Runtime>
void raise_on_bad_label(Runtime& rt, const GolInputs& in, const Prepared& prepared) {
  if (!check_labels_on_host() || !rt.host_sync_allowed()) return;
  const auto relaxed = rt.relaxed_capture_guard();
  // first_bad_code is the header's fourth 8-byte word.
  const at::Tensor words = prepared.header.view(at::kLong);
  const uint64_t code = static_cast<uint64_t>(words[3].item<int64_t>());
  if (code != 0) {
    const int64_t first_bad = static_cast<int64_t>(~code);
    const GolParams& p = in.params;
    const int64_t value = in.labels[first_bad].item<int64_t>();
    TORCH_CHECK_VALUE(false, "gol_loss: labels[", first_bad, "] = ", value,
                      " is out of range: expected a class in [0, ", p.num_classes - 1, "], ",
                      p.num_classes, " for background, or ignore_index=", p.ignore_index);
  }
}

// The math a call's float kernels run (csrc/gol_math.h), fixed per launch.
inline MathKind math_kind(const GolParams& p, bool float64) {
  if (p.activation == Activation::kSigmoid) return MathKind::kSigmoid;
  if (float64) return MathKind::kClosed;
  return clamp_is_bounded(p.clamp_min, p.clamp_max) ? MathKind::kBounded : MathKind::kSeries;
}

// The fused kernel for a call: its element type, math kind, grad mode and where its seed is.
template <typename dev_t, bool kSeedOnDevice>
auto rows_kernel_for(MathKind kind, GradMode grad_mode) {
  using Kernel = void (*)(const RowsArgs<dev_t>);
  constexpr GradMode kRef = GradMode::kReference, kExact = GradMode::kExact;
  const bool exact = grad_mode == kExact;
  if (kind == MathKind::kSigmoid) {
    return Kernel(gol_rows_kernel<dev_t, MathKind::kSigmoid, kRef, kSeedOnDevice>);
  }
  if constexpr (std::is_same_v<dev_t, double>) {
    return exact ? Kernel(gol_rows_kernel<dev_t, MathKind::kClosed, kExact, kSeedOnDevice>)
                 : Kernel(gol_rows_kernel<dev_t, MathKind::kClosed, kRef, kSeedOnDevice>);
  } else if (kind == MathKind::kBounded) {
    return exact ? Kernel(gol_rows_kernel<dev_t, MathKind::kBounded, kExact, kSeedOnDevice>)
                 : Kernel(gol_rows_kernel<dev_t, MathKind::kBounded, kRef, kSeedOnDevice>);
  } else {
    return exact ? Kernel(gol_rows_kernel<dev_t, MathKind::kSeries, kExact, kSeedOnDevice>)
                 : Kernel(gol_rows_kernel<dev_t, MathKind::kSeries, kRef, kSeedOnDevice>);
  }
}

template <typename dev_t>
auto rows_kernel_for(MathKind kind, GradMode grad_mode, bool seed_on_device) {
  return seed_on_device ? rows_kernel_for<dev_t, true>(kind, grad_mode)
                        : rows_kernel_for<dev_t, false>(kind, grad_mode);
}

template <class Runtime>
std::tuple<at::Tensor, at::Tensor> gol_loss(
    const at::Tensor& logits, const at::Tensor& labels,
    const std::optional<at::Tensor>& drop_classes, const std::optional<at::Tensor>& class_weight,
    const std::optional<at::Tensor>& row_weight, const at::Tensor& seed, int64_t offset,
    c10::string_view mode, c10::string_view activation, c10::string_view reduction,
    std::optional<double> clamp_min, std::optional<double> clamp_max, c10::string_view grad_mode,
    int64_t ignore_index, bool need_grad) {
  GolInputs in = prepare_gol_inputs(logits, labels, drop_classes, class_weight, row_weight, seed,
                                    offset, mode, activation, reduction, clamp_min, clamp_max,
                                    grad_mode, ignore_index, need_grad);
  Runtime rt(in.logits);
  // The fused kernel's vector loads need 16-byte (8 for 16-bit types) aligned logits; a storage
  // offset can break that: such logits are copied (the outputs are allocated aligned).
  if (reinterpret_cast<uintptr_t>(in.logits.data_ptr()) % (kChunk * in.logits.element_size()) != 0) {
    in.logits = in.logits.clone();
  }
  at::Tensor loss = allocate_loss(in);
  at::Tensor grad = allocate_grad(in);
  const GolParams& p = in.params;
  if (p.num_rows == 0) {
    loss.zero_();
    return {loss, grad};
  }
  const Prepared prepared = launch_prepare(rt, in);
  // A warp per row, at most the runtime's grid limit of blocks (a grid-stride loop over rows).
  const int64_t blocks = grid_size(rt, p.num_rows * kWarp);
  at::Tensor partials = at::empty({blocks}, in.logits.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.logits.scalar_type(), "gol_loss_cuda", [&] {
    using dev_t = device_scalar_t<scalar_t>;
    using math_t = math_type_t<dev_t>;
    RowsArgs<dev_t> args{};
    args.logits = device_ptr<const dev_t>(in.logits);
    args.rows = device_ptr<const RowFact<math_t>>(prepared.rows);
    args.drop_flags = device_ptr<const uint8_t>(prepared.drop_flags);
    args.has_drop = in.drop_classes.defined();
    args.class_weight = device_ptr<const math_t>(in.class_weight);
    args.device_seed = device_seed_ptr(in);
    args.round_keys = philox_round_keys(p.philox);
    args.header = const_cast<CallHeader*>(prepared.header_ptr());
    args.params = p;
    args.grad = p.need_grad ? device_ptr<dev_t>(grad) : nullptr;
    args.loss_none = p.reduction == Reduction::kNone ? device_ptr<dev_t>(loss) : nullptr;
    args.partials = partials.data_ptr<double>();
    args.loss = p.reduction == Reduction::kNone ? nullptr : loss.data_ptr<math_t>();
    const MathKind kind = math_kind(p, std::is_same_v<dev_t, double>);
    rt.launch(rows_kernel_for<dev_t>(kind, p.grad_mode, args.device_seed != nullptr),
              Launch{blocks, kThreads, 0}, args);
  });
  raise_on_bad_label(rt, in, prepared);
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
  const Prepared prepared = launch_prepare(rt, in);
  const int64_t blocks = (p.num_rows + kStatsRows - 1) / kStatsRows;
  at::Tensor loss_partials = at::empty({blocks}, in.logits.options().dtype(at::kDouble));
  at::Tensor stat_partials =
      at::empty({blocks, 2, p.num_classes}, in.logits.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.logits.scalar_type(), "gol_loss_class_stats_cuda", [&] {
    using dev_t = device_scalar_t<scalar_t>;
    using math_t = math_type_t<dev_t>;
    rt.launch(gol_loss_class_stats_kernel<dev_t>, Launch{blocks, kThreads, 0},
              device_ptr<const dev_t>(in.logits), device_ptr<const RowFact<math_t>>(prepared.rows),
              in.drop_classes.defined() ? device_ptr<const uint8_t>(prepared.drop_flags) : nullptr,
              device_ptr<const math_t>(in.class_weight), device_ptr<const math_t>(in.pos_weight),
              prepared.header_ptr(), device_seed_ptr(in), p, device_ptr<dev_t>(grad),
              loss_partials.data_ptr<double>(), stat_partials.data_ptr<double>());
    rt.launch(sum_partials_kernel<math_t>, Launch{1, kThreads, 0},
              loss_partials.data_ptr<double>(), blocks, prepared.header_ptr(),
              p.reduction == Reduction::kMean, loss.data_ptr<math_t>());
  });
  rt.launch(sum_class_stats_kernel, Launch{(p.num_classes + kThreads - 1) / kThreads, kThreads, 0},
            stat_partials.data_ptr<double>(), blocks, p.num_classes, pos_stats.data_ptr<double>(),
            neg_stats.data_ptr<double>());
  raise_on_bad_label(rt, in, prepared);
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
  // The loss's upstream gradient is float32 or float64: read as it is, no conversion launch.
  const bool as_is = grad_output.scalar_type() == at::kFloat ||
                     grad_output.scalar_type() == at::kDouble;
  const at::Tensor scale = as_is ? grad_output.contiguous() : grad_output.to(at::kFloat);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "scale_grad_cuda", [&] {
    using dev_t = device_scalar_t<scalar_t>;
    const Launch launch{grid_size(rt, n), kThreads, 0};
    if (scale.scalar_type() == at::kDouble) {
      rt.launch(scale_grad_kernel<dev_t, double>, launch, device_ptr<dev_t>(grad),
                scale.data_ptr<double>(), n);
    } else {
      rt.launch(scale_grad_kernel<dev_t, float>, launch, device_ptr<dev_t>(grad),
                scale.data_ptr<float>(), n);
    }
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
