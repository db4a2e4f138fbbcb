// CPU implementation of gumbel::gol_loss, gumbel::gumbel_activation and gumbel::scale_grad_.
//
// One pass over the logits computes loss and gradient together. Rows are grouped into blocks of
// kRowsPerPartial; each block's loss is summed in a fixed order into its own partial and the
// partials are added in index order, so the result does not depend on the thread count.
// Within a float row only the kept negatives (nonzero weight, not dropped: about a third of a
// DropLoss row on LVIS) run through the at::vec element math of csrc/gol_math.h, packed densely
// (csrc/cpu/lane_packing.h); the single positive column is done apart, so the hot loop never
// tests y. float64 rows (gradcheck) take a plain scalar loop over the same formulas.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../gol_checks.h"
#include "../gol_math.h"
#include "huge_pages.h"
#include "lane_packing.h"
#include "philox_avx2.h"
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

// 64-bit words of a per-column bitmask, with one spare word so that reading the eight bits at
// any column j < C may touch word (j >> 6) + 1.
inline int64_t drop_words(int64_t num_classes) { return (num_classes >> 6) + 2; }

// The kernel's view of one call: read-only after setup, shared by all threads.
template <typename math_t>
struct Plan {
  GolParams p;
  const int64_t* labels = nullptr;
  const bool* drop = nullptr;
  const math_t* row_weight = nullptr;
  std::vector<math_t> fg_weight;  // foreground rows, negative column j: (1 - T_j) * cw_j (eql/droploss)
  std::vector<math_t> class_weight;  // cw_j (1 without class_weight): background rows before
                                    // dropping
  std::vector<math_t> positive_weight;  // the positive column j: pos_weight_j, else cw_j
  std::vector<uint64_t> drop_bits;  // bit j: class j is a drop class (T_j = 1)
  std::vector<uint64_t> fg_nonzero_bits;  // bit j: fg_weight[j] != 0
  std::vector<uint64_t> nonzero_bits;     // bit j: class_weight[j] != 0
  bool drops_foreground = false;  // eql/droploss: foreground rows drop drop-class negatives
  bool drop_background = false;   // DropLoss draws uniforms on background rows
  bool nonfinite_class_weight = false;  // some class/positive weight is NaN or +-Inf
  float ratio = 0.0f;
  math_t inv_denominator = 1;
  double denominator = 1.0;  // reduction "mean": the non-ignored rows (at least 1)
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
  const math_t* pw = in.pos_weight.defined() ? in.pos_weight.data_ptr<math_t>() : nullptr;

  const LabelCounts counts = count_labels(plan.labels, plan.drop, p);
  const bool drops_foreground = p.mode != Mode::kBce && plan.drop != nullptr;
  plan.drops_foreground = drops_foreground;
  plan.fg_weight.resize(c);
  plan.class_weight.resize(c);
  plan.positive_weight.resize(c);
  plan.drop_bits.assign(drop_words(c), 0);
  plan.fg_nonzero_bits.assign(drop_words(c), 0);
  plan.nonzero_bits.assign(drop_words(c), 0);
  bool any_drop_class = false;
  for (int64_t j = 0; j < c; ++j) {
    const math_t class_w = cw ? cw[j] : math_t(1);
    const bool is_drop = plan.drop != nullptr && plan.drop[j];
    any_drop_class = any_drop_class || is_drop;
    plan.fg_weight[j] = (drops_foreground && is_drop) ? math_t(0) * class_w : class_w;
    plan.class_weight[j] = class_w;
    plan.positive_weight[j] = pw ? pw[j] : class_w;
    const uint64_t bit = uint64_t(1) << (j & 63);
    if (is_drop) plan.drop_bits[j >> 6] |= bit;
    // A weight of 0 (NaN weights count as nonzero) makes an element's loss and gradient 0.
    if (!(plan.fg_weight[j] == math_t(0))) plan.fg_nonzero_bits[j >> 6] |= bit;
    if (!(class_w == math_t(0))) plan.nonzero_bits[j >> 6] |= bit;
    plan.nonfinite_class_weight = plan.nonfinite_class_weight || !std::isfinite(class_w) ||
                                  !std::isfinite(plan.positive_weight[j]);
  }
  if (p.mode == Mode::kDropLoss && any_drop_class && counts.foreground > 0) {
    plan.ratio = static_cast<float>(counts.foreground_drop) / static_cast<float>(counts.foreground);
    // u < 1 always, so a ratio of 1 drops nothing and the uniforms need not be drawn.
    plan.drop_background = plan.ratio < 1.0f;
  }
  if (p.reduction == Reduction::kMean) {
    plan.denominator = static_cast<double>(counts.valid > 0 ? counts.valid : 1);
    plan.inv_denominator = math_t(1) / static_cast<math_t>(plan.denominator);
  }
  return plan;
}

// Background row of DropLoss: sets bit j of `dropped` when element (row, j) is dropped, i.e.
// T_j = 1 and u > ratio. Element (i, j) uses word (e & 3) of Philox call e >> 2, e = i*C + j;
// a row rarely starts on a group boundary, so groups are drawn sixteen at a time (64 elements)
// and their bits shifted into the row's place.
template <typename math_t>
void background_row_dropped(const Plan<math_t>& plan, int64_t row, uint64_t* dropped) {
  constexpr int64_t kGroups = 16;
  const int64_t c = plan.p.num_classes;
  const int64_t first = row * c;
  const int64_t last = first + c;  // exclusive
  const int64_t words = drop_words(c);
  std::fill(dropped, dropped + words, uint64_t(0));
#if defined(CPU_CAPABILITY_AVX2)
  const PhiloxDropConstants constants(plan.p.philox, plan.ratio);
#endif
  for (int64_t g0 = first >> 2; g0 * 4 < last; g0 += kGroups) {
    // Bit 4k + w: element 4 (g0 + k) + w has u > ratio.
#if defined(CPU_CAPABILITY_AVX2)
    uint64_t bits = drop_bits_groups16(g0, constants);
#else
    uint64_t bits = 0;
    for (int64_t k = 0; k < kGroups; ++k) {
      const Philox4 r = philox_group(g0 + k, plan.p.philox);
      for (int w = 0; w < 4; ++w) {
        bits |= uint64_t(uniform_from_bits(r.w[w]) > plan.ratio) << (4 * k + w);
      }
    }
#endif
    int64_t position = g0 * 4 - first;  // column of bit 0, >= -3
    if (position < 0) {
      bits >>= -position;
      position = 0;
    }
    // Bits past the row land in the spare word (drop_words) and are cleared below.
    const int64_t shift = position & 63;
    dropped[position >> 6] |= bits << shift;
    if (shift != 0) dropped[(position >> 6) + 1] |= bits >> (64 - shift);
  }
  // Only drop classes drop; this also clears the bits past column C - 1.
  for (int64_t w = 0; w < words; ++w) dropped[w] &= plan.drop_bits[w];
}

// The eight bits of `mask` at columns j .. j + 7.
inline uint32_t mask_byte(const uint64_t* mask, int64_t j) {
  const int64_t shift = j & 63;
  uint64_t bits = mask[j >> 6] >> shift;
  if (shift > 56) bits |= mask[(j >> 6) + 1] << (64 - shift);
  return static_cast<uint32_t>(bits & 0xFF);
}

// The element math a call runs on its negatives, chosen once per call (see choose_path).
enum class Path { kGumbelBounded, kGumbelLean, kGumbelGeneral, kSigmoid };

Path choose_path(const GolParams& p) {
  if (p.activation == Activation::kSigmoid) return Path::kSigmoid;
  if (clamp_is_bounded(p.clamp_min, p.clamp_max)) return Path::kGumbelBounded;
  // The lean exp/log need t = exp(-q) to stay a normal float (q below ~80).
  return p.clamp_max <= 80.0f ? Path::kGumbelLean : Path::kGumbelGeneral;
}

// Unweighted loss and gradient of eight negatives. The bounded path leaves out the poison
// term, which the row adds for every lane (csrc/gol_math.h). lo / hi: the clamp, splatted by
// the caller once per row (reloaded per vector, the params could alias the float stores).
template <Path kPath>
inline void negatives8(const GolParams& p, const Vec& lo, const Vec& hi, const Vec& q, Vec* loss,
                       Vec* grad) {
  if constexpr (kPath == Path::kGumbelBounded) {
    ElementMath<VecOpsT<true>>::gumbel_negative_bounded_core(q, lo, hi, p.grad_mode, loss, grad);
  } else if constexpr (kPath == Path::kGumbelLean) {
    ElementMath<VecOpsT<true>>::gumbel_negative_series(q, lo, hi, p.grad_mode, loss, grad);
  } else if constexpr (kPath == Path::kGumbelGeneral) {
    ElementMath<VecOpsT<false>>::gumbel_negative_series(q, lo, hi, p.grad_mode, loss, grad);
  } else {
    ElementMath<VecOpsT<true>>::sigmoid(q, /*positive=*/false, loss, grad);
  }
}

// The packed kept negatives of one row: q and w hold `count` elements followed by zeros up to
// the next multiple of 8 (zero weight, finite q). Writes w*grad*grad_scale and (reduction
// "none") w*loss*loss_scale to the packed outputs; returns sum w*loss, lanes summed in a fixed
// order.
template <Path kPath>
double packed_negatives(const GolParams& p, const float* q, const float* w, int64_t count,
                        float* grad, float* loss_out, float grad_scale, float loss_scale) {
  constexpr int64_t kWidth = Vec::size();
  const Vec gscale(grad_scale), lscale(loss_scale);
  const Vec lo(p.clamp_min), hi(p.clamp_max);
  Vec acc[2] = {Vec(0.0f), Vec(0.0f)};
  auto element = [&](int64_t j, Vec& sum) {
    const Vec wv = Vec::loadu(w + j);
    Vec lv, gv;
    negatives8<kPath>(p, lo, hi, Vec::loadu(q + j), &lv, &gv);
    const Vec weighted = wv * lv;
    sum = sum + weighted;
    if (grad != nullptr) (wv * gscale * gv).store(grad + j);
    if (loss_out != nullptr) (weighted * lscale).store(loss_out + j);
  };
  int64_t j = 0;
  // Two vectors per step: their long exp/div chains are independent, so they overlap.
  for (; j + 2 * kWidth <= count; j += 2 * kWidth) {
    element(j, acc[0]);
    element(j + kWidth, acc[1]);
  }
  for (; j < count; j += kWidth) element(j, acc[0]);
  float lanes[2][kWidth];
  acc[0].store(lanes[0]);
  acc[1].store(lanes[1]);
  double total = 0.0;
  for (int k = 0; k < kWidth; ++k) total += static_cast<double>(lanes[0][k]) + lanes[1][k];
  return total;
}

// Negative columns of one float64 row (gradcheck path): scalar, same formulas.
template <bool kGumbel>
double negatives_double(const GolParams& p, const double* q, const double* w,
                        const uint64_t* dropped, double* grad, double* loss_out, int64_t begin,
                        int64_t end, double grad_scale, double loss_scale) {
  using Math = ElementMath<ScalarOps<double>>;
  double total = 0.0;
  for (int64_t j = begin; j < end; ++j) {
    double l, g;
    if constexpr (kGumbel) {
      Math::gumbel_negative(Math::gumbel(q[j], p.clamp_min, p.clamp_max), p.grad_mode, &l, &g);
    } else {
      Math::sigmoid(q[j], false, &l, &g);
    }
    const bool is_dropped = dropped != nullptr && ((dropped[j >> 6] >> (j & 63)) & 1);
    const double wj = is_dropped ? 0.0 : w[j];
    total += wj * l;
    if (grad != nullptr) grad[j] = wj * g * grad_scale;
    if (loss_out != nullptr) loss_out[j] = wj * l * loss_scale;
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

// Per-thread scratch: float copies of a half row, the row's dropped and kept bits, and the
// packed kept negatives with their results (8 spare floats each for whole-vector writes).
template <typename math_t>
struct Scratch {
  std::vector<math_t> q, grad, loss;
  std::vector<uint64_t> dropped, kept;
  std::vector<float> packed_q, packed_w, packed_grad, packed_loss;
  explicit Scratch(int64_t c)
      : q(c), grad(c), loss(c), dropped(drop_words(c)), kept(drop_words(c)),
        packed_q(c + 16), packed_w(c + 16), packed_grad(c + 16), packed_loss(c + 16) {}
};

// The negatives of one float row: the kept ones (nonzero weight, not dropped) are packed,
// computed and expanded back; every other lane gets 0. All lanes, kept or not, carry the
// poison term of their logit, so a NaN/Inf logit surfaces in the gradient and in the loss
// even where its weight is 0 (SPEC.md section 6). Returns the weighted loss sum.
template <Path kPath>
double float_negatives(const Plan<float>& plan, const float* q, const float* weights,
                       const uint64_t* kept, float* g, float* l, float grad_scale,
                       float loss_scale, Scratch<float>& scratch) {
  constexpr int64_t kWidth = Vec::size();
  const int64_t c = plan.p.num_classes;
  float* packed_q = scratch.packed_q.data();
  float* packed_w = scratch.packed_w.data();
  Vec poison(0.0f);
  int64_t count = 0;
  for (int64_t j = 0; j < c; j += kWidth) {
    const int64_t width = std::min<int64_t>(kWidth, c - j);
    // Lanes past the row read as q = 0, w = 0 and are never kept (no kept bits past C).
    const Vec qv = width == kWidth ? Vec::loadu(q + j) : Vec::loadu(q + j, width);
    const Vec wv = width == kWidth ? Vec::loadu(weights + j) : Vec::loadu(weights + j, width);
    poison = poison + (qv - qv);
    const uint32_t mask = mask_byte(kept, j) & kChunkLanes;
    pack_lanes(wv, mask, packed_w + count);
    count += pack_lanes(qv, mask, packed_q + count);
  }
  Vec(0.0f).store(packed_q + count);
  Vec(0.0f).store(packed_w + count);
  float* packed_grad = g != nullptr ? scratch.packed_grad.data() : nullptr;
  float* packed_loss = l != nullptr ? scratch.packed_loss.data() : nullptr;
  double sum = packed_negatives<kPath>(plan.p, packed_q, packed_w, count, packed_grad,
                                       packed_loss, grad_scale, loss_scale);
  if (g != nullptr || l != nullptr) {
    int64_t position = 0;
    for (int64_t j = 0; j < c; j += kWidth) {
      const int64_t width = std::min<int64_t>(kWidth, c - j);
      const Vec qv = width == kWidth ? Vec::loadu(q + j) : Vec::loadu(q + j, width);
      const Vec lane_poison = qv - qv;
      const uint32_t mask = mask_byte(kept, j) & kChunkLanes;
      if (g != nullptr) (expand_lanes(packed_grad + position, mask) + lane_poison).store(g + j, width);
      if (l != nullptr) (expand_lanes(packed_loss + position, mask) + lane_poison).store(l + j, width);
      position += popcount8(mask);
    }
  }
  float lanes[kWidth];
  poison.store(lanes);
  for (int k = 0; k < kWidth; ++k) sum += lanes[k];
  return sum;
}

// A row whose weights are not all finite (a NaN/Inf class, positive or row weight), element by
// element in the reference's order: w = (0 if dropped else 1) * class_weight * row_weight, then
// w * loss and w * grad, so that 0 * Inf and 0 * NaN give NaN where the reference does (the
// packed path never multiplies a skipped element). Rare: no vectors. Returns the loss sum.
template <typename math_t, Path kPath>
double exact_weights_row(const Plan<math_t>& plan, const math_t* q, const uint64_t* dropped,
                         int64_t row, math_t* g, math_t* l) {
  using Math = ElementMath<ScalarOps<math_t>>;
  const GolParams& p = plan.p;
  const int64_t c = p.num_classes;
  const int64_t label = plan.labels[row];
  const bool foreground = label < c;
  const math_t row_w = plan.row_weight ? plan.row_weight[row] : math_t(1);
  const math_t lo = p.clamp_min, hi = p.clamp_max;
  double sum = 0.0;
  for (int64_t j = 0; j < c; ++j) {
    const bool positive = j == label;
    const bool is_drop = plan.drop != nullptr && plan.drop[j];
    const bool zeroed = !positive && is_drop &&
                        (foreground ? plan.drops_foreground
                                    : dropped != nullptr && ((dropped[j >> 6] >> (j & 63)) & 1));
    const math_t class_w = positive ? plan.positive_weight[j] : plan.class_weight[j];
    const math_t w = (zeroed ? math_t(0) : math_t(1)) * class_w * row_w;
    math_t el, eg;
    if constexpr (kPath == Path::kSigmoid) {
      Math::sigmoid(q[j], positive, &el, &eg);
    } else if (positive) {
      Math::gumbel_positive(Math::gumbel(q[j], lo, hi), p.grad_mode, &el, &eg);
    } else if constexpr (std::is_same_v<math_t, float>) {
      Math::gumbel_negative_series(q[j], lo, hi, p.grad_mode, &el, &eg);
    } else {
      Math::gumbel_negative(Math::gumbel(q[j], lo, hi), p.grad_mode, &el, &eg);
    }
    const math_t weighted = w * el;
    sum += static_cast<double>(weighted);
    if (g != nullptr) g[j] = w * eg * plan.inv_denominator;
    if (l != nullptr) l[j] = weighted;
  }
  return sum;
}

// One row: loss sum (times its row weight) returned; grad / loss rows written.
// Per-class sums of |gradient| of one task's rows (gol_loss_class_stats), before the final
// scaling: positive and negative elements apart.
struct ClassStatsPartial {
  double* positive = nullptr;
  double* negative = nullptr;
};

// Adds |g_j| of one row to the negative sums, and the positive column's to the positive ones.
template <typename math_t>
void accumulate_class_stats(const math_t* g, int64_t c, int64_t positive_column,
                            const ClassStatsPartial& stats) {
  for (int64_t j = 0; j < c; ++j) {
    if (j != positive_column) stats.negative[j] += std::abs(static_cast<double>(g[j]));
  }
  if (positive_column >= 0) {
    stats.positive[positive_column] += std::abs(static_cast<double>(g[positive_column]));
  }
}

template <typename scalar_t, typename math_t, Path kPath>
double process_row(const Plan<math_t>& plan, const scalar_t* logits_row, scalar_t* grad_row,
                   scalar_t* loss_row, int64_t row, Scratch<math_t>& scratch,
                   const ClassStatsPartial& stats) {
  constexpr bool kGumbel = kPath != Path::kSigmoid;
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

  const math_t* weights = foreground ? plan.fg_weight.data() : plan.class_weight.data();
  const uint64_t* dropped = nullptr;
  if (!foreground && plan.drop_background) {
    background_row_dropped(plan, row, scratch.dropped.data());
    dropped = scratch.dropped.data();
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

  double sum;
  const bool exact_weights = plan.nonfinite_class_weight || !std::isfinite(row_w);
  if (exact_weights) {
    sum = exact_weights_row<math_t, kPath>(plan, q, dropped, row, g, l);
  } else if constexpr (std::is_same_v<math_t, double>) {
    sum = negatives_double<kGumbel>(p, q, weights, dropped, g, l, 0, foreground ? label : c,
                                    grad_scale, loss_scale);
    if (foreground) {
      sum += negatives_double<kGumbel>(p, q, weights, dropped, g, l, label + 1, c, grad_scale,
                                       loss_scale);
    }
  } else {
    // Kept negatives: nonzero weight, minus the positive column or the dropped elements.
    const int64_t words = drop_words(c);
    uint64_t* kept = scratch.kept.data();
    const uint64_t* nonzero = foreground ? plan.fg_nonzero_bits.data() : plan.nonzero_bits.data();
    for (int64_t w = 0; w < words; ++w) kept[w] = dropped ? nonzero[w] & ~dropped[w] : nonzero[w];
    if (foreground) kept[label >> 6] &= ~(uint64_t(1) << (label & 63));
    sum = float_negatives<kPath>(plan, q, weights, kept, g, l, grad_scale, loss_scale, scratch);
  }
  if (foreground && !exact_weights) {
    // Written after the negatives, which gave its lane 0.
    math_t d;
    const math_t lpos = positive_element<math_t, kGumbel>(p, q[label], &d);
    const math_t wpos = plan.positive_weight[label];
    sum += static_cast<double>(wpos * lpos);
    if (g != nullptr) g[label] = wpos * d * grad_scale;
    if (l != nullptr) l[label] = wpos * lpos * loss_scale;
  }

  if (stats.negative != nullptr) accumulate_class_stats(g, c, foreground ? label : -1, stats);

  if constexpr (!kDirect) {
    if (grad_row != nullptr) at::vec::convert(g, grad_row, c);
    if (loss_row != nullptr) at::vec::convert(l, loss_row, c);
  }
  return exact_weights ? sum : sum * static_cast<double>(row_w);
}

// The class statistics' rows per task: fixed, so their partials (and the sums) do not depend
// on the thread count.
constexpr int64_t kPartialsPerStatsTask = 16;

// pos_stats / neg_stats: gol_loss_class_stats's outputs (float64 (C,)), or undefined.
template <typename scalar_t, Path kPath>
void run_gol_loss(const GolInputs& in, at::Tensor& loss, at::Tensor& grad,
                  at::Tensor* pos_stats = nullptr, at::Tensor* neg_stats = nullptr) {
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
  // Without statistics a task is one row block; with them, kPartialsPerStatsTask blocks that
  // share one pair of (C,) partial sums.
  const bool with_stats = pos_stats != nullptr;
  const int64_t blocks_per_task = with_stats ? kPartialsPerStatsTask : 1;
  const int64_t num_tasks = (num_partials + blocks_per_task - 1) / blocks_per_task;
  std::vector<double> stat_partials(with_stats ? num_tasks * 2 * c : 0, 0.0);
  at::parallel_for(0, num_tasks, 1, [&](int64_t first_task, int64_t end_task) {
    Scratch<math_t> scratch(c);
    for (int64_t task = first_task; task < end_task; ++task) {
      ClassStatsPartial stats;
      if (with_stats) {
        stats.positive = stat_partials.data() + task * 2 * c;
        stats.negative = stats.positive + c;
      }
      const int64_t block_end = std::min(num_partials, (task + 1) * blocks_per_task);
      for (int64_t block = task * blocks_per_task; block < block_end; ++block) {
        double block_sum = 0.0;
        const int64_t row_end = std::min(n, (block + 1) * kRowsPerPartial);
        for (int64_t row = block * kRowsPerPartial; row < row_end; ++row) {
          const int64_t offset = row * c;
          block_sum += process_row<scalar_t, math_t, kPath>(
              plan, logits + offset, grad_ptr ? grad_ptr + offset : nullptr,
              loss_ptr ? loss_ptr + offset : nullptr, row, scratch, stats);
        }
        partials[block] = block_sum;
      }
    }
  });
  if (p.reduction != Reduction::kNone) {
    double total = 0.0;
    for (const double part : partials) total += part;
    if (p.reduction == Reduction::kMean) total *= static_cast<double>(plan.inv_denominator);
    loss.fill_(total);
  }
  if (with_stats) {
    // The gradient rows hold w d row_w / denominator: the statistics undo the denominator.
    const double unscale = plan.denominator;
    double* pos = pos_stats->data_ptr<double>();
    double* neg = neg_stats->data_ptr<double>();
    for (int64_t task = 0; task < num_tasks; ++task) {
      const double* part = stat_partials.data() + task * 2 * c;
      for (int64_t j = 0; j < c; ++j) {
        pos[j] += part[j];
        neg[j] += part[c + j];
      }
    }
    for (int64_t j = 0; j < c; ++j) {
      pos[j] *= unscale;
      neg[j] *= unscale;
    }
  }
}

// One of the four paths (choose_path) for this call's dtype.
template <typename scalar_t, typename... Stats>
void dispatch_path(const GolInputs& in, at::Tensor& loss, at::Tensor& grad, Stats... stats) {
  switch (choose_path(in.params)) {
    case Path::kGumbelBounded: run_gol_loss<scalar_t, Path::kGumbelBounded>(in, loss, grad, stats...); break;
    case Path::kGumbelLean: run_gol_loss<scalar_t, Path::kGumbelLean>(in, loss, grad, stats...); break;
    case Path::kGumbelGeneral: run_gol_loss<scalar_t, Path::kGumbelGeneral>(in, loss, grad, stats...); break;
    case Path::kSigmoid: run_gol_loss<scalar_t, Path::kSigmoid>(in, loss, grad, stats...); break;
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
  // The N x C outputs on huge pages (csrc/cpu/huge_pages.h); the scalar loss as usual.
  at::Tensor loss = in.params.reduction == Reduction::kNone
                        ? empty_huge_page_backed(in.logits.sizes(), in.logits.options())
                        : allocate_loss(in);
  at::Tensor grad = in.params.need_grad
                        ? empty_huge_page_backed(in.logits.sizes(), in.logits.options())
                        : allocate_grad(in);
  if (in.params.num_rows == 0) {
    loss.zero_();
    return {loss, grad};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.logits.scalar_type(), "gol_loss_cpu",
                                  [&] { dispatch_path<scalar_t>(in, loss, grad); });
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gol_loss_class_stats_cpu(
    const at::Tensor& logits, const at::Tensor& labels,
    const std::optional<at::Tensor>& drop_classes, const std::optional<at::Tensor>& class_weight,
    const std::optional<at::Tensor>& pos_weight, const std::optional<at::Tensor>& row_weight,
    const at::Tensor& seed, int64_t offset, c10::string_view mode, c10::string_view activation,
    c10::string_view reduction, std::optional<double> clamp_min, std::optional<double> clamp_max,
    c10::string_view grad_mode, int64_t ignore_index) {
  const GolInputs in = prepare_class_stats_inputs(
      logits, labels, drop_classes, class_weight, pos_weight, row_weight, seed, offset, mode,
      activation, reduction, clamp_min, clamp_max, grad_mode, ignore_index);
  at::Tensor loss = allocate_loss(in);
  at::Tensor grad = empty_huge_page_backed(in.logits.sizes(), in.logits.options());
  at::Tensor pos_stats = allocate_class_stat(in);
  at::Tensor neg_stats = allocate_class_stat(in);
  if (in.params.num_rows == 0) {
    loss.zero_();
    return {loss, grad, pos_stats, neg_stats};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in.logits.scalar_type(), "gol_loss_class_stats_cpu",
      [&] { dispatch_path<scalar_t>(in, loss, grad, &pos_stats, &neg_stats); });
  return {loss, grad, pos_stats, neg_stats};
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
  m.impl("gol_loss_class_stats", &gk::cpu::gol_loss_class_stats_cpu);
  m.impl("gumbel_activation", &gk::cpu::gumbel_activation_cpu);
  m.impl("scale_grad_", &gk::cpu::scale_grad_cpu);
}
