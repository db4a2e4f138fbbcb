// CPU implementation of gumbel::gol_loss, gumbel::gumbel_activation and gumbel::scale_grad_.
//
// One pass over the logits computes loss and gradient together. Rows are grouped into blocks of
// kRowsPerPartial; each block's loss is summed in a fixed order into its own partial and the
// partials are added in index order, so the result does not depend on the thread count.
// Within a row the negatives run through the at::vec body of csrc/gol_math.h and the single
// positive column is done apart, so the hot loop never tests y.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../gol_checks.h"
#include "../gol_math.h"
#include "vec_ops.h"

namespace gk {
namespace cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kRowsPerPartial = 16;

// Row statistics of the labels pre-pass: it also rejects out-of-range labels before any
// element is touched.
struct LabelCounts {
  int64_t valid = 0;
  int64_t foreground = 0;
  int64_t foreground_drop = 0;
};

LabelCounts count_labels(const int64_t* labels, const bool* drop, const GolParams& p) {
  LabelCounts counts;
  for (int64_t i = 0; i < p.num_rows; ++i) {
    const int64_t label = labels[i];
    if (label == p.ignore_index) continue;
    TORCH_CHECK_VALUE(label >= 0 && label <= p.num_classes, "gol_loss: labels[", i, "] = ", label,
                      " is out of range: expected a class in [0, ", p.num_classes - 1, "], ",
                      p.num_classes, " for background, or ignore_index=", p.ignore_index);
    ++counts.valid;
    if (label < p.num_classes) {
      ++counts.foreground;
      if (drop != nullptr && drop[label]) ++counts.foreground_drop;
    }
  }
  return counts;
}

// The kernel's view of one call: read-only after setup, shared by all threads.
template <typename math_t>
struct Plan {
  GolParams p;
  const int64_t* labels = nullptr;
  const bool* drop = nullptr;
  const math_t* row_weight = nullptr;
  std::vector<math_t> fg_weight;  // foreground rows, negative column j: (1 - T_j) * cw_j (eql/droploss)
  std::vector<math_t> bg_weight;  // background rows before dropping: cw_j
  std::vector<math_t> pos_weight;  // the positive column: cw_j
  bool drop_background = false;   // DropLoss draws uniforms on background rows
  float ratio = 0.0f;
  math_t inv_denominator = 1;
};

template <typename math_t>
Plan<math_t> make_plan(const GolInputs& in) {
  Plan<math_t> plan;
  plan.p = in.params;
  const GolParams& p = plan.p;
  const int64_t c = p.num_classes;
  plan.labels = in.labels.data_ptr<int64_t>();
  plan.drop = in.drop_classes.defined() ? in.drop_classes.data_ptr<bool>() : nullptr;
  plan.row_weight = in.row_weight.defined() ? in.row_weight.data_ptr<math_t>() : nullptr;
  const math_t* cw = in.class_weight.defined() ? in.class_weight.data_ptr<math_t>() : nullptr;

  const LabelCounts counts = count_labels(plan.labels, plan.drop, p);
  const bool drops_foreground = p.mode != Mode::kBce && plan.drop != nullptr;
  plan.fg_weight.resize(c);
  plan.bg_weight.resize(c);
  plan.pos_weight.resize(c);
  bool any_drop_class = false;
  for (int64_t j = 0; j < c; ++j) {
    const math_t class_w = cw ? cw[j] : math_t(1);
    const bool is_drop = plan.drop != nullptr && plan.drop[j];
    any_drop_class = any_drop_class || is_drop;
    plan.fg_weight[j] = (drops_foreground && is_drop) ? math_t(0) * class_w : class_w;
    plan.bg_weight[j] = class_w;
    plan.pos_weight[j] = class_w;
  }
  if (p.mode == Mode::kDropLoss && any_drop_class && counts.foreground > 0) {
    plan.ratio = static_cast<float>(counts.foreground_drop) / static_cast<float>(counts.foreground);
    // u < 1 always, so a ratio of 1 drops nothing and the uniforms need not be drawn.
    plan.drop_background = plan.ratio < 1.0f;
  }
  if (p.reduction == Reduction::kMean) {
    plan.inv_denominator = math_t(1) / static_cast<math_t>(counts.valid > 0 ? counts.valid : 1);
  }
  return plan;
}

// Background row of DropLoss: weights with the dropped elements zeroed. Element (i, j) uses word
// (e & 3) of Philox call e >> 2, e = i*C + j; a row rarely starts on a group boundary, so the
// groups are walked and clipped to the row. Groups go through Philox in batches of kLanes
// independent calls, written as plain loops the compiler turns into SIMD.
template <typename math_t>
void background_row_weights(const Plan<math_t>& plan, int64_t row, math_t* out) {
  constexpr int kLanes = 8;
  const int64_t c = plan.p.num_classes;
  const int64_t first = row * c;
  const int64_t last = first + c;  // exclusive
  std::copy(plan.bg_weight.begin(), plan.bg_weight.end(), out);
  const int64_t g_begin = first >> 2;
  const int64_t g_end = ((last - 1) >> 2) + 1;
  const PhiloxKey& key = plan.p.philox;
  uint32_t words[4][kLanes];
  for (int64_t g0 = g_begin; g0 < g_end; g0 += kLanes) {
    const int lanes = static_cast<int>(std::min<int64_t>(kLanes, g_end - g0));
    for (int lane = 0; lane < kLanes; ++lane) {
      const Philox4 r = philox_group(g0 + lane, key);
      for (int w = 0; w < 4; ++w) words[w][lane] = r.w[w];
    }
    for (int lane = 0; lane < lanes; ++lane) {
      for (int w = 0; w < 4; ++w) {
        const int64_t e = (g0 + lane) * 4 + w;
        if (e < first || e >= last) continue;
        const int64_t j = e - first;
        if (plan.drop[j] && uniform_from_bits(words[w][lane]) > plan.ratio) out[j] = math_t(0);
      }
    }
  }
}

// Negative columns [begin, end) of one float row: writes w*grad*grad_scale and (reduction
// "none") w*loss*loss_scale; returns sum_j w_j loss_j. Lanes are summed in a fixed order.
template <bool kGumbel>
double negatives_float(const GolParams& p, const float* q, const float* w, float* grad,
                       float* loss_out, int64_t begin, int64_t end, float grad_scale,
                       float loss_scale) {
  using Math = ElementMath<VecOps>;
  const Vec lo(p.clamp_min), hi(p.clamp_max), gscale(grad_scale), lscale(loss_scale);
  Vec acc(0.0f);
  for (int64_t j = begin; j < end; j += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), end - j);
    // Padding lanes of a partial load read as q = 0, w = 0: finite, and weighted to zero.
    const Vec qv = count == Vec::size() ? Vec::loadu(q + j) : Vec::loadu(q + j, count);
    const Vec wv = count == Vec::size() ? Vec::loadu(w + j) : Vec::loadu(w + j, count);
    Vec lv, gv;
    if constexpr (kGumbel) {
      const auto g = Math::gumbel(qv, lo, hi);
      Math::gumbel_negative(g, p.grad_mode, &lv, &gv);
    } else {
      Math::sigmoid(qv, /*positive=*/false, &lv, &gv);
    }
    const Vec weighted = wv * lv;
    acc = acc + weighted;
    if (grad != nullptr) (wv * gv * gscale).store(grad + j, count);
    if (loss_out != nullptr) (weighted * lscale).store(loss_out + j, count);
  }
  float lanes[Vec::size()];
  acc.store(lanes);
  double total = 0.0;
  for (int k = 0; k < Vec::size(); ++k) total += lanes[k];
  return total;
}

// Negative columns of one float64 row (gradcheck path): scalar, same formulas.
template <bool kGumbel>
double negatives_double(const GolParams& p, const double* q, const double* w, double* grad,
                        double* loss_out, int64_t begin, int64_t end, double grad_scale,
                        double loss_scale) {
  using Math = ElementMath<ScalarOps<double>>;
  double total = 0.0;
  for (int64_t j = begin; j < end; ++j) {
    double l, g;
    if constexpr (kGumbel) {
      Math::gumbel_negative(Math::gumbel(q[j], p.clamp_min, p.clamp_max), p.grad_mode, &l, &g);
    } else {
      Math::sigmoid(q[j], false, &l, &g);
    }
    total += w[j] * l;
    if (grad != nullptr) grad[j] = w[j] * g * grad_scale;
    if (loss_out != nullptr) loss_out[j] = w[j] * l * loss_scale;
  }
  return total;
}

template <typename math_t, bool kGumbel>
math_t positive_element(const GolParams& p, math_t q, math_t* grad) {
  using Math = ElementMath<ScalarOps<math_t>>;
  math_t l, g;
  if constexpr (kGumbel) {
    Math::gumbel_positive(Math::gumbel(q, p.clamp_min, p.clamp_max), p.grad_mode, &l, &g);
  } else {
    Math::sigmoid(q, true, &l, &g);
  }
  *grad = g;
  return l;
}

// Per-thread scratch: float copies of a half row, and the background row's weights.
template <typename math_t>
struct Scratch {
  std::vector<math_t> q, grad, loss, weight;
  explicit Scratch(int64_t c) : q(c), grad(c), loss(c), weight(c) {}
};

// One row: loss sum (times its row weight) returned; grad / loss rows written.
template <typename scalar_t, typename math_t, bool kGumbel>
double process_row(const Plan<math_t>& plan, const scalar_t* logits_row, scalar_t* grad_row,
                   scalar_t* loss_row, int64_t row, Scratch<math_t>& scratch) {
  const GolParams& p = plan.p;
  const int64_t c = p.num_classes;
  const int64_t label = plan.labels[row];
  if (label == p.ignore_index) {
    if (grad_row != nullptr) std::fill(grad_row, grad_row + c, scalar_t(0));
    if (loss_row != nullptr) std::fill(loss_row, loss_row + c, scalar_t(0));
    return 0.0;
  }
  const bool foreground = label < c;
  const math_t row_w = plan.row_weight ? plan.row_weight[row] : math_t(1);
  const math_t grad_scale = row_w * plan.inv_denominator;
  const math_t loss_scale = row_w;

  const math_t* weights = foreground ? plan.fg_weight.data() : plan.bg_weight.data();
  if (!foreground && plan.drop_background) {
    background_row_weights(plan, row, scratch.weight.data());
    weights = scratch.weight.data();
  }

  // float and double rows are worked on in place; half rows through float scratch.
  constexpr bool kDirect = std::is_same_v<scalar_t, math_t>;
  const math_t* q;
  math_t* g = nullptr;
  math_t* l = nullptr;
  if constexpr (kDirect) {
    q = logits_row;
    g = grad_row;
    l = loss_row;
  } else {
    at::vec::convert(logits_row, scratch.q.data(), c);
    q = scratch.q.data();
    if (grad_row != nullptr) g = scratch.grad.data();
    if (loss_row != nullptr) l = scratch.loss.data();
  }

  auto negatives = [&](int64_t begin, int64_t end) -> double {
    if (begin >= end) return 0.0;
    if constexpr (std::is_same_v<math_t, double>) {
      return negatives_double<kGumbel>(p, q, weights, g, l, begin, end, grad_scale, loss_scale);
    } else {
      return negatives_float<kGumbel>(p, q, weights, g, l, begin, end, grad_scale, loss_scale);
    }
  };

  double sum;
  if (foreground) {
    sum = negatives(0, label) + negatives(label + 1, c);
    math_t d;
    const math_t lpos = positive_element<math_t, kGumbel>(p, q[label], &d);
    const math_t wpos = plan.pos_weight[label];
    sum += static_cast<double>(wpos * lpos);
    if (g != nullptr) g[label] = wpos * d * grad_scale;
    if (l != nullptr) l[label] = wpos * lpos * loss_scale;
  } else {
    sum = negatives(0, c);
  }

  if constexpr (!kDirect) {
    if (grad_row != nullptr) at::vec::convert(g, grad_row, c);
    if (loss_row != nullptr) at::vec::convert(l, loss_row, c);
  }
  return sum * static_cast<double>(row_w);
}

template <typename scalar_t, bool kGumbel>
void run_gol_loss(const GolInputs& in, at::Tensor& loss, at::Tensor& grad) {
  using math_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const Plan<math_t> plan = make_plan<math_t>(in);
  const GolParams& p = plan.p;
  const int64_t n = p.num_rows;
  const int64_t c = p.num_classes;
  const scalar_t* logits = in.logits.data_ptr<scalar_t>();
  scalar_t* grad_ptr = p.need_grad ? grad.data_ptr<scalar_t>() : nullptr;
  scalar_t* loss_ptr = p.reduction == Reduction::kNone ? loss.data_ptr<scalar_t>() : nullptr;

  const int64_t num_partials = (n + kRowsPerPartial - 1) / kRowsPerPartial;
  std::vector<double> partials(num_partials, 0.0);
  at::parallel_for(0, num_partials, 1, [&](int64_t first_block, int64_t end_block) {
    Scratch<math_t> scratch(c);
    for (int64_t block = first_block; block < end_block; ++block) {
      double block_sum = 0.0;
      const int64_t row_end = std::min(n, (block + 1) * kRowsPerPartial);
      for (int64_t row = block * kRowsPerPartial; row < row_end; ++row) {
        const int64_t offset = row * c;
        block_sum += process_row<scalar_t, math_t, kGumbel>(
            plan, logits + offset, grad_ptr ? grad_ptr + offset : nullptr,
            loss_ptr ? loss_ptr + offset : nullptr, row, scratch);
      }
      partials[block] = block_sum;
    }
  });
  if (p.reduction != Reduction::kNone) {
    double total = 0.0;
    for (const double part : partials) total += part;
    if (p.reduction == Reduction::kMean) total *= static_cast<double>(plan.inv_denominator);
    loss.fill_(total);
  }
}

std::tuple<at::Tensor, at::Tensor> gol_loss_cpu(
    const at::Tensor& logits, const at::Tensor& labels,
    const std::optional<at::Tensor>& drop_classes, const std::optional<at::Tensor>& class_weight,
    const std::optional<at::Tensor>& row_weight, const at::Tensor& seed, int64_t offset,
    c10::string_view mode, c10::string_view activation, c10::string_view reduction,
    std::optional<double> clamp_min, std::optional<double> clamp_max, c10::string_view grad_mode,
    int64_t ignore_index, bool need_grad) {
  const GolInputs in = prepare_gol_inputs(logits, labels, drop_classes, class_weight, row_weight,
                                          seed, offset, mode, activation, reduction, clamp_min,
                                          clamp_max, grad_mode, ignore_index, need_grad);
  at::Tensor loss = allocate_loss(in);
  at::Tensor grad = allocate_grad(in);
  if (in.params.num_rows == 0) {
    loss.zero_();
    return {loss, grad};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.logits.scalar_type(), "gol_loss_cpu", [&] {
    if (in.params.activation == Activation::kGumbel) {
      run_gol_loss<scalar_t, true>(in, loss, grad);
    } else {
      run_gol_loss<scalar_t, false>(in, loss, grad);
    }
  });
  return {loss, grad};
}

at::Tensor gumbel_activation_cpu(const at::Tensor& logits) {
  TORCH_CHECK_TYPE(at::isFloatingType(logits.scalar_type()),
                   "gumbel_activation: logits must be a floating tensor, got ", logits.scalar_type());
  const at::Tensor x = logits.contiguous();
  at::Tensor out = at::empty_like(x);
  if (x.scalar_type() != at::kFloat) {
    // Half and double inputs are not on the hot path (inference scores are float32).
    const auto math = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    return at::exp(-at::exp(-x.to(math))).to(x.scalar_type());
  }
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, x.numel(), 32768, [&](int64_t begin, int64_t end) {
    at::vec::map([](Vec v) { return v.neg().exp().neg().exp(); }, dst + begin, src + begin,
                 end - begin);
  });
  return out;
}

void scale_grad_cpu(at::Tensor& grad, const at::Tensor& grad_output) {
  if (grad_output.numel() == 1) {
    // On the CPU reading the scalar is free: skip the pass for the common unit upstream gradient.
    if (grad_output.item<double>() == 1.0) return;
    grad.mul_(grad_output.reshape({}));
    return;
  }
  TORCH_CHECK_VALUE(grad_output.sizes() == grad.sizes(), "scale_grad_: grad_output has shape ",
                    shape_of(grad_output), " but the saved gradient has shape ", shape_of(grad));
  grad.mul_(grad_output);
}

}  // namespace
}  // namespace cpu
}  // namespace gk

TORCH_LIBRARY_IMPL(gumbel, CPU, m) {
  m.impl("gol_loss", &gk::cpu::gol_loss_cpu);
  m.impl("gumbel_activation", &gk::cpu::gumbel_activation_cpu);
  m.impl("scale_grad_", &gk::cpu::scale_grad_cpu);
}
