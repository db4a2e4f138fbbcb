// Argument checking and normalisation for gumbel::gol_loss, shared by the CPU and CUDA
// implementations so both reject bad input with the same messages (ValueError/TypeError in
// Python, each naming the argument and the shapes) before any kernel touches memory.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Functions.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>

#include "gol_math.h"

namespace gk {

struct GolInputs {
  at::Tensor logits;        // (N, C), contiguous
  at::Tensor labels;        // (N,), int64, contiguous
  at::Tensor drop_classes;  // (C,), bool, contiguous; undefined when absent
  at::Tensor class_weight;  // (C,), math dtype, contiguous; undefined when absent
  at::Tensor row_weight;    // (N,), math dtype, contiguous; undefined when absent
  at::Tensor pos_weight;    // (C,), math dtype, contiguous; gol_loss_class_stats only
  at::Tensor seed;          // (1,), int64, on the CPU (read here into params.philox) or on the
                            // logits' device (read by the kernel; params.philox has key 0)
  GolParams params;
};

inline std::string shape_of(const at::Tensor& t) { return c10::str(t.sizes()); }

template <typename Enum>
Enum parse_choice(c10::string_view value, const char* argument,
                  std::initializer_list<std::pair<const char*, Enum>> choices) {
  std::string allowed;
  for (const auto& choice : choices) {
    if (value == choice.first) return choice.second;
    allowed += allowed.empty() ? "" : ", ";
    allowed += std::string("'") + choice.first + "'";
  }
  TORCH_CHECK_VALUE(false, "gol_loss: ", argument, " must be one of ", allowed, ", got '",
                    std::string(value), "'");
}

inline at::Tensor checked_vector(const std::optional<at::Tensor>& maybe, const char* argument,
                                 int64_t expected, const char* expected_name,
                                 const at::Tensor& logits) {
  if (!maybe.has_value() || !maybe->defined()) return at::Tensor();
  const at::Tensor& t = *maybe;
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "gol_loss: ", argument,
                   " must be a floating tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == expected, "gol_loss: ", argument,
                    " must have shape (", expected_name, ",) = (", expected, ",), got ",
                    shape_of(t));
  TORCH_CHECK_VALUE(t.device() == logits.device(), "gol_loss: ", argument, " is on ",
                    t.device(), " but logits are on ", logits.device());
  const auto math_dtype =
      logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return t.to(math_dtype).contiguous();
}

inline GolInputs prepare_gol_inputs(
    const at::Tensor& logits, const at::Tensor& labels,
    const std::optional<at::Tensor>& drop_classes, const std::optional<at::Tensor>& class_weight,
    const std::optional<at::Tensor>& row_weight, const at::Tensor& seed, int64_t offset,
    c10::string_view mode, c10::string_view activation, c10::string_view reduction,
    std::optional<double> clamp_min, std::optional<double> clamp_max, c10::string_view grad_mode,
    int64_t ignore_index, bool need_grad) {
  GolInputs in;
  TORCH_CHECK_VALUE(logits.dim() == 2, "gol_loss: logits must have shape (N, C), got ",
                    shape_of(logits));
  const auto dtype = logits.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                       dtype == at::kDouble,
                   "gol_loss: logits must be float32, float16, bfloat16 or float64, got ", dtype);
  const int64_t n = logits.size(0);
  const int64_t c = logits.size(1);
  TORCH_CHECK_VALUE(c >= 1, "gol_loss: logits must have at least one class column, got shape ",
                    shape_of(logits));
  // The kernels index rows and columns in 32 bits (the flat index N * C in 64), and their
  // grid-stride loops step by up to 2^13 rows or 2^7 columns past the last one: 2^16 of
  // headroom keeps every such step inside int32.
  constexpr int64_t kMaxExtent = (int64_t(1) << 31) - (int64_t(1) << 16);
  TORCH_CHECK_VALUE(n <= kMaxExtent && c <= kMaxExtent, "gol_loss: logits of shape ",
                    shape_of(logits), " have more than 2^31 - 2^16 rows or columns");
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == n,
                    "gol_loss: labels must have shape (N,) = (", n, ",) to match logits ",
                    shape_of(logits), ", got ", shape_of(labels));
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
                   "gol_loss: labels must be int64 (or int32), got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.device() == logits.device(), "gol_loss: labels are on ",
                    labels.device(), " but logits are on ", logits.device());
  TORCH_CHECK_VALUE(seed.numel() == 1 && !at::isFloatingType(seed.scalar_type()) &&
                        seed.scalar_type() != at::kBool &&
                        (seed.device().is_cpu() || seed.device() == logits.device()),
                    "gol_loss: seed must be a one-element integer tensor on the CPU or on the "
                    "logits' device ", logits.device(), ", got ", seed.scalar_type(), " ",
                    shape_of(seed), " on ", seed.device());
  TORCH_CHECK_VALUE(offset >= 0, "gol_loss: offset must be >= 0, got ", offset);

  in.logits = logits.contiguous();
  in.labels = labels.to(at::kLong).contiguous();
  if (drop_classes.has_value() && drop_classes->defined()) {
    const at::Tensor& d = *drop_classes;
    TORCH_CHECK_TYPE(d.scalar_type() == at::kBool, "gol_loss: drop_classes must be a bool tensor, got ",
                     d.scalar_type());
    TORCH_CHECK_VALUE(d.dim() == 1 && d.size(0) == c, "gol_loss: drop_classes must have shape (C,) = (",
                      c, ",) to match logits ", shape_of(logits), ", got ", shape_of(d));
    TORCH_CHECK_VALUE(d.device() == logits.device(), "gol_loss: drop_classes are on ", d.device(),
                      " but logits are on ", logits.device());
    in.drop_classes = d.contiguous();
  }
  in.class_weight = checked_vector(class_weight, "class_weight", c, "C", logits);
  in.row_weight = checked_vector(row_weight, "row_weight", n, "N", logits);

  GolParams& p = in.params;
  p.num_rows = n;
  p.num_classes = c;
  p.mode = parse_choice<Mode>(mode, "mode",
                              {{"bce", Mode::kBce}, {"eql", Mode::kEql}, {"droploss", Mode::kDropLoss}});
  p.activation = parse_choice<Activation>(
      activation, "activation", {{"gumbel", Activation::kGumbel}, {"sigmoid", Activation::kSigmoid}});
  p.reduction = parse_choice<Reduction>(
      reduction, "reduction",
      {{"mean", Reduction::kMean}, {"sum", Reduction::kSum}, {"none", Reduction::kNone}});
  p.grad_mode = parse_choice<GradMode>(
      grad_mode, "grad_mode", {{"reference", GradMode::kReference}, {"exact", GradMode::kExact}});
  const float inf = std::numeric_limits<float>::infinity();
  p.clamp_min = clamp_min.has_value() ? static_cast<float>(*clamp_min) : -inf;
  p.clamp_max = clamp_max.has_value() ? static_cast<float>(*clamp_max) : inf;
  TORCH_CHECK_VALUE(!std::isnan(p.clamp_min) && !std::isnan(p.clamp_max) &&
                        p.clamp_min < p.clamp_max,
                    "gol_loss: clamp must satisfy clamp_min < clamp_max, got (", p.clamp_min, ", ",
                    p.clamp_max, ")");
  p.ignore_index = ignore_index;
  in.seed = seed.to(at::kLong).reshape({1}).contiguous();
  // A device seed is read by the kernel (reading it here would wait for the device).
  const uint64_t seed_bits =
      in.seed.device().is_cpu() ? static_cast<uint64_t>(in.seed.item<int64_t>()) : 0;
  const uint64_t offset_bits = static_cast<uint64_t>(offset);
  p.philox = PhiloxKey{static_cast<uint32_t>(seed_bits), static_cast<uint32_t>(seed_bits >> 32),
                       static_cast<uint32_t>(offset_bits), static_cast<uint32_t>(offset_bits >> 32)};
  p.need_grad = need_grad;
  return in;
}

// gol_loss_class_stats: gol_loss's inputs plus pos_weight, with a gradient and a scalar loss.
inline GolInputs prepare_class_stats_inputs(
    const at::Tensor& logits, const at::Tensor& labels,
    const std::optional<at::Tensor>& drop_classes, const std::optional<at::Tensor>& class_weight,
    const std::optional<at::Tensor>& pos_weight, const std::optional<at::Tensor>& row_weight,
    const at::Tensor& seed, int64_t offset, c10::string_view mode, c10::string_view activation,
    c10::string_view reduction, std::optional<double> clamp_min, std::optional<double> clamp_max,
    c10::string_view grad_mode, int64_t ignore_index) {
  GolInputs in = prepare_gol_inputs(logits, labels, drop_classes, class_weight, row_weight, seed,
                                    offset, mode, activation, reduction, clamp_min, clamp_max,
                                    grad_mode, ignore_index, /*need_grad=*/true);
  TORCH_CHECK_VALUE(in.params.reduction != Reduction::kNone,
                    "gol_loss_class_stats: reduction must be 'mean' or 'sum', got 'none'");
  in.pos_weight = checked_vector(pos_weight, "pos_weight", in.params.num_classes, "C", logits);
  return in;
}

// The per-class statistics of gol_loss_class_stats: float64 (C,), on the logits' device.
inline at::Tensor allocate_class_stat(const GolInputs& in) {
  return at::zeros({in.params.num_classes}, in.logits.options().dtype(at::kDouble));
}

// Output allocation shared by the devices: the scalar loss is float32 (float64 for float64
// logits); reduction "none" returns (N, C) in the logits' dtype.
inline at::Tensor allocate_loss(const GolInputs& in) {
  if (in.params.reduction == Reduction::kNone) return at::empty_like(in.logits);
  const auto math_dtype = in.logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::empty({}, in.logits.options().dtype(math_dtype));
}

inline at::Tensor allocate_grad(const GolInputs& in) {
  return in.params.need_grad ? at::empty_like(in.logits) : at::empty({0}, in.logits.options());
}

}  // namespace gk
