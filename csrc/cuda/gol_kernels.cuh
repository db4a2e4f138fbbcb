// The CUDA device code of gumbel::gol_loss, gol_loss_class_stats, gumbel_activation and
// scale_grad_: kernels and their device helpers, free of torch types.
//
// It includes only gol_math.h and the standard library, so that it compiles twice: by nvcc for
// the GPU (csrc/cuda/gol_loss_kernel.cu, after <cuda_fp16.h>/<cuda_bf16.h>), and as host C++
// under the emulation runtime (csrc/cuda_emulation/runtime.h), which runs every CUDA thread of a
// block as an OS thread so that the CPU tests, ASan/UBSan and TSan see exactly this code. The
// host side (grid sizes, launches, the label check) is csrc/cuda/gol_host.h, also shared.
//
// A gol_loss call (gol_host.h) is a memset of the small header, prepare_kernel, then
// gol_rows_kernel:
//  - prepare_kernel (a grid over N + C items) writes one RowFact per row (the row's kind and
//    positive column, its row weight) and one drop flag per column, and counts the valid,
//    foreground and
//    foreground-of-a-drop-class rows and the first bad label with integer atomics (their
//    order does not matter);
//  - gol_rows_kernel gives each warp whole rows: the row's facts are warp-uniform (one
//    broadcast load per row, and fg/bg/ignored is a branch per row, never per element), the
//    16-byte-aligned part of the row is walked in chunks of four flat elements (one Philox
//    call, one 128-bit load and store), the up to six elements before and after it one at a
//    time; each thread sums its losses in float, blocks sum in a fixed tree into a double
//    partial, and the last block to finish (an atomic ticket) adds the partials in block order:
//    the loss is bit-identical run to run and needs no further launch.
//
// Element types: float, double, __half and __nv_bfloat16 (the host maps at::Half/at::BFloat16
// onto the last two); the math runs in float (double for double).
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

#include "../gol_math.h"

// bench/sass_report.py compiles this header with GK_SASS_COMMON_PATH defined: every branch off
// the common path (a background row of DropLoss with the default clamp, no class weights, whole
// aligned groups) then does nothing, so that the grid-stride loop's SASS is exactly what that
// path executes, and its instructions can be counted. GK_ON_COMMON_PATH(value, expr) is a
// runtime-uniform switch that the common path takes with `value` (ptxas would otherwise unswitch
// the loop into one copy per combination, and the counted copy would be ambiguous).
#if defined(GK_SASS_COMMON_PATH)
#define GK_OFF_COMMON_PATH(...) 0
#define GK_ON_COMMON_PATH(value, ...) (value)
#else
#define GK_OFF_COMMON_PATH(...) __VA_ARGS__
#define GK_ON_COMMON_PATH(value, ...) (__VA_ARGS__)
#endif

namespace gk {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr int kChunk = 4;  // flat elements per vector step: one Philox call, one 128-bit load
// gol_loss_class_stats: rows per block (each block sums its rows' statistics per column).
constexpr int64_t kStatsRows = 8;

// A row's kind (RowFact::code >= 0 is a foreground row's positive column).
constexpr int32_t kBackgroundRow = -1;
constexpr int32_t kIgnoredRow = -2;
constexpr int32_t kBadLabelRow = -3;

template <typename math_t>
struct RowFact {
  int32_t code;  // the positive column, or kBackgroundRow / kIgnoredRow / kBadLabelRow
  math_t scale;  // the row weight (1 without row_weight)
};

// The call's label statistics, zeroed by the host before prepare_kernel adds to them.
struct CallHeader {
  unsigned long long valid;
  unsigned long long foreground;
  unsigned long long foreground_drop;
  unsigned long long first_bad_code;  // max over bad rows of ~index (0: none)
  unsigned int ticket;                // blocks of gol_rows_kernel done
  unsigned int pad;
};

// ---------------------------------------------------------------------------------------------
// Element type conversions (math in float for the 16-bit types).
template <typename scalar_t>
struct MathType {
  using type = float;
};
template <>
struct MathType<double> {
  using type = double;
};
template <typename scalar_t>
using math_type_t = typename MathType<scalar_t>::type;

__device__ __forceinline__ float to_math(float x) { return x; }
__device__ __forceinline__ double to_math(double x) { return x; }
__device__ __forceinline__ float to_math(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_math(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_math(math_type_t<scalar_t> x) {
  if constexpr (std::is_same_v<scalar_t, __half>) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same_v<scalar_t, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return x;
  }
}

template <typename scalar_t>
struct alignas(sizeof(scalar_t) * kChunk) Chunk {
  scalar_t v[kChunk];
};

// The Philox key of a call: by value, or read on the device from `device_seed` (a seed drawn by
// a kernel of the same stream, e.g. under CUDA-graph capture, where every replay draws anew).
__device__ __forceinline__ PhiloxKey resolve_philox_key(PhiloxKey key,
                                                        const int64_t* device_seed) {
  if (device_seed != nullptr) {
    const uint64_t seed = static_cast<uint64_t>(*device_seed);
    key.key0 = static_cast<uint32_t>(seed);
    key.key1 = static_cast<uint32_t>(seed >> 32);
  }
  return key;
}

// u = (x >> 8) 2^-24 > ratio for a Philox word x, as one unsigned compare: u > ratio exactly
// when (x >> 8) > floor(ratio 2^24), i.e. x > floor(ratio 2^24) 2^8 + 255 (ratio is a float in
// [0, 1): ratio 2^24 is exact).
__device__ __forceinline__ uint32_t drop_threshold_bits(float ratio) {
  const uint32_t top = static_cast<uint32_t>(ratio * 16777216.0f);
  return (top << 8) | 0xFFu;
}

// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ T block_sum(T value, T* shared) {
  // Fixed tree over the block: the same inputs give the same bits.
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  const T total = shared[0];
  __syncthreads();
  return total;
}

// The per-row facts, the drop flags per column and the label statistics (see the top).
template <typename math_t>
__global__ void __launch_bounds__(kThreads) prepare_kernel(
    const int64_t* __restrict__ labels, const bool* __restrict__ drop,
    const math_t* __restrict__ row_weight, int64_t n, int64_t c, int64_t ignore_index,
    RowFact<math_t>* __restrict__ rows, uint8_t* __restrict__ drop_flags,
    CallHeader* __restrict__ header) {
  __shared__ long long shared[kThreads];
  long long valid = 0, foreground = 0, foreground_drop = 0;
  unsigned long long bad_code = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n + c;
       i += stride) {
    if (i < n) {
      const int64_t label = labels[i];
      int32_t code = kIgnoredRow;
      if (label != ignore_index) {
        if (label < 0 || label > c) {
          code = kBadLabelRow;
          const unsigned long long mine = ~static_cast<unsigned long long>(i);
          bad_code = mine > bad_code ? mine : bad_code;
        } else {
          ++valid;
          code = label < c ? static_cast<int32_t>(label) : kBackgroundRow;
          if (label < c) {
            ++foreground;
            if (drop != nullptr && drop[label]) ++foreground_drop;
          }
        }
      }
      rows[i] = RowFact<math_t>{code, row_weight != nullptr ? row_weight[i] : math_t(1)};
    } else {
      drop_flags[i - n] = drop != nullptr && drop[i - n] ? 1 : 0;
    }
  }
  valid = block_sum<long long>(valid, shared);
  foreground = block_sum<long long>(foreground, shared);
  foreground_drop = block_sum<long long>(foreground_drop, shared);
  if (threadIdx.x == 0) {
    atomicAdd(&header->valid, static_cast<unsigned long long>(valid));
    atomicAdd(&header->foreground, static_cast<unsigned long long>(foreground));
    atomicAdd(&header->foreground_drop, static_cast<unsigned long long>(foreground_drop));
  }
  if (bad_code != 0) atomicMax(&header->first_bad_code, bad_code);
}

// ---------------------------------------------------------------------------------------------
// The element math a call takes, fixed at compile time (csrc/gol_math.h). The float kernels
// take the bounded path for clamps inside [-4, 27] (GOL's (-4, 10)), the series path for the
// others; float64 the closed forms.
enum class MathKind : int32_t { kBounded, kSeries, kClosed, kSigmoid };

// Resident blocks per SM the fused kernel is built for (__launch_bounds__, which caps its
// registers): for the bounded float math, GOL's, 6 x 256 threads, 75% occupancy on sm_80/sm_90
// at 40 registers, which it fits without spilling because the rare partial groups run one
// element at a time; the series and sigmoid math need up to 64 (4 blocks, 50%), float64 up to
// 128 (2). Turing holds 1024 threads per SM: at most 4 blocks there. tests/test_cuda_binary.py
// checks that no instantiation spills.
template <typename scalar_t, MathKind kMath>
constexpr int min_blocks_per_sm() {
  const int blocks = std::is_same_v<scalar_t, double> ? 2 : kMath == MathKind::kBounded ? 6 : 4;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 750
  return blocks < 4 ? blocks : 4;
#else
  return blocks;
#endif
}

// The loss and gradient of a negative; those of the bounded path without the NaN/Inf poison
// term, which the caller adds while weighting (one fused multiply-add each).
template <typename math_t, MathKind kMath, GradMode kGrad>
__device__ __forceinline__ void negative_element(math_t q, math_t lo, math_t hi, math_t* loss,
                                                 math_t* grad) {
  using Math = ElementMath<ScalarOps<math_t>>;
  if constexpr (kMath == MathKind::kSigmoid) {
    Math::sigmoid(q, false, loss, grad);
  } else if constexpr (kMath == MathKind::kBounded) {
    Math::gumbel_negative_bounded_core(q, lo, hi, kGrad, loss, grad);
  } else if constexpr (kMath == MathKind::kSeries) {
    Math::gumbel_negative_series(q, lo, hi, kGrad, loss, grad);
  } else {
    Math::gumbel_negative(Math::gumbel(q, lo, hi), kGrad, loss, grad);
  }
}

template <typename math_t, MathKind kMath, GradMode kGrad>
__device__ __forceinline__ void positive_element(math_t q, math_t lo, math_t hi, math_t* loss,
                                                 math_t* grad) {
  using Math = ElementMath<ScalarOps<math_t>>;
  if constexpr (kMath == MathKind::kSigmoid) {
    Math::sigmoid(q, true, loss, grad);
  } else {
    Math::gumbel_positive(Math::gumbel(q, lo, hi), kGrad, loss, grad);
  }
}

// The same element math chosen at run time (gol_loss_class_stats, off the hot path).
template <typename math_t>
__device__ __forceinline__ void element_loss_grad(const GolParams& p, math_t q, bool positive,
                                                  math_t* loss, math_t* grad) {
  using Math = ElementMath<ScalarOps<math_t>>;
  if (p.activation == Activation::kSigmoid) {
    Math::sigmoid(q, positive, loss, grad);
  } else if (positive) {
    Math::gumbel_positive(Math::gumbel(q, p.clamp_min, p.clamp_max), p.grad_mode, loss, grad);
  } else if constexpr (std::is_same_v<math_t, float>) {
    if (clamp_is_bounded(p.clamp_min, p.clamp_max)) {
      Math::gumbel_negative_bounded(q, p.clamp_min, p.clamp_max, p.grad_mode, loss, grad);
    } else {
      Math::gumbel_negative_series(q, p.clamp_min, p.clamp_max, p.grad_mode, loss, grad);
    }
  } else {
    Math::gumbel_negative(Math::gumbel(q, p.clamp_min, p.clamp_max), p.grad_mode, loss, grad);
  }
}

// Everything gol_rows_kernel reads besides the element math's template arguments.
template <typename scalar_t>
struct RowsArgs {
  using math_t = math_type_t<scalar_t>;
  const scalar_t* logits;
  const RowFact<math_t>* rows;
  const uint8_t* drop_flags;      // C entries (all 0 without drop_classes)
  bool has_drop;                  // drop_classes was given
  const math_t* class_weight;     // C or null
  const int64_t* device_seed;     // null: the seed is in params.philox
  // params.philox's round keys, computed on the host: the rounds then read them as constant
  // operands (no per-call key additions); unused with a device seed.
  PhiloxRoundKeys round_keys;
  CallHeader* header;
  GolParams params;
  scalar_t* grad;                 // null when need_grad is false
  scalar_t* loss_none;            // reduction "none", else null
  double* partials;               // one per block
  math_t* loss;                   // the scalar loss ("mean" / "sum"), else null
};

// What a call's label statistics fix for every element (read once per thread).
template <typename math_t>
struct CallConstants {
  bool drops_foreground;  // eql/droploss: a foreground row drops its drop-class negatives
  bool drop_background;   // droploss: background rows draw
  uint32_t threshold;     // drop_threshold_bits(ratio)
  math_t inv_denominator;  // 1 / #valid rows for "mean", else 1
  __device__ CallConstants(const CallHeader& header, const GolParams& p, bool has_drop) {
    drops_foreground = p.mode != Mode::kBce && has_drop;
    drop_background = false;
    threshold = 0xFFFFFFFFu;
    if (p.mode == Mode::kDropLoss && has_drop && header.foreground > 0) {
      const float ratio =
          static_cast<float>(header.foreground_drop) / static_cast<float>(header.foreground);
      drop_background = ratio < 1.0f;  // u < 1: a ratio of 1 drops nothing
      threshold = drop_threshold_bits(ratio);
    }
    inv_denominator = math_t(1);
    if (p.reduction == Reduction::kMean) {
      inv_denominator =
          math_t(1) / static_cast<math_t>(header.valid > 0 ? header.valid : 1ull);
    }
  }
};

// One row's view of the call: its weights and switches, fixed for the whole row (a warp's).
template <typename scalar_t, MathKind kMath, GradMode kGrad>
struct RowContext {
  using math_t = math_type_t<scalar_t>;
  const RowsArgs<scalar_t>& a;
  math_t lo, hi;
  // The element weight's row factors in the reference's order, w = (0 if dropped, else 1) *
  // class weight * row weight, with 0 * a NaN/Inf row weight kept NaN: for the loss (row_w),
  // and for the gradient (times 1 / #rows for "mean").
  math_t keep_loss, drop_loss, keep_grad, grad_scale;
  bool drops_all;  // every drop-class negative of the row is dropped (foreground, eql/droploss)
  bool draws;      // the row's drop-class negatives are dropped where u > ratio (background)
  bool store_grad, store_loss;
  uint32_t threshold;
  int32_t positive_col;
  const PhiloxRoundKeys& round_keys;

  // kClassWeight: the call has class weights (class_weight: this element's); else
  // `loss_weight` is the element's whole loss weight (drop_loss or keep_loss).
  template <bool kClassWeight>
  __device__ __forceinline__ math_t element(math_t q, bool positive, bool dropped,
                                            math_t loss_weight, const math_t* class_weight,
                                            math_t* grad) const {
    math_t l, g;
    // The poison term q - q (NaN for a NaN/Inf logit, else 0) of negative_element's bounded
    // path, added by the weighting FMAs: (l + poison) w and l w + poison agree, NaN included.
    math_t poison = 0;
    if (positive) {
      positive_element<math_t, kMath, kGrad>(q, lo, hi, &l, &g);
    } else {
      negative_element<math_t, kMath, kGrad>(q, lo, hi, &l, &g);
      if constexpr (kMath == MathKind::kBounded) poison = q - q;
    }
    if constexpr (kClassWeight) {
      const math_t class_w = __ldg(class_weight);
      const math_t w = dropped ? math_t(0) * class_w : class_w;
      *grad = fma(g, w * keep_grad, poison);
      return fma(l, w * keep_loss, poison);
    } else {
      *grad = fma(g, positive ? keep_grad : loss_weight * grad_scale, poison);
      return fma(l, positive ? keep_loss : loss_weight, poison);
    }
  }

  // The drop decision of the element at column col: its column's flag, and for a background
  // row its Philox word against the threshold; a foreground row's positive is never dropped
  // (kMaybePositive: the group may hold it).
  template <bool kMaybePositive>
  __device__ __forceinline__ bool dropped(int32_t col, uint32_t word) const {
    return (drops_all || draws) && __ldg(a.drop_flags + col) != 0 &&
           (drops_all || word > threshold) && !(kMaybePositive && col == positive_col);
  }

  // One element's weighted loss (returned) and gradient (*grad).
  template <bool kMaybePositive, bool kClassWeight>
  __device__ __forceinline__ math_t weighted(scalar_t x, int32_t col, bool drop,
                                             math_t* grad) const {
    const bool positive = kMaybePositive && col == positive_col;
    return element<kClassWeight>(to_math(x), positive, drop, drop ? drop_loss : keep_loss,
                                 kClassWeight ? a.class_weight + col : nullptr, grad);
  }

  // The four flat elements of Philox group e0 / 4 (col = e0 - the row's first flat index, so
  // element k is column col + k), all in this row and 16-byte aligned: one Philox call, one
  // 128-bit load and one 128-bit store of the gradient (the "none" losses too). The drop
  // decisions come first (the Philox words die before the element math). kMaybePositive: the
  // row's positive column may be among the four.
  template <bool kMaybePositive, bool kClassWeight>
  __device__ __forceinline__ math_t group(int64_t e0, int32_t col) const {
    bool drop[kChunk] = {};
    if (drops_all || draws) {
      Philox4 bits{{0, 0, 0, 0}};
      if (draws) bits = philox_group(e0 >> 2, round_keys);
#pragma unroll
      for (int k = 0; k < kChunk; ++k) drop[k] = dropped<kMaybePositive>(col + k, bits.w[k]);
    }
    const Chunk<scalar_t> in = *reinterpret_cast<const Chunk<scalar_t>*>(a.logits + e0);
    Chunk<scalar_t> grad_out, loss_out;
    math_t sum = 0;
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      math_t d;
      const math_t l =
          weighted<kMaybePositive, kClassWeight>(in.v[k], col + k, drop[k], &d);
      sum += l;
      grad_out.v[k] = from_math<scalar_t>(d);
      loss_out.v[k] = from_math<scalar_t>(l);
    }
    if (store_grad) *reinterpret_cast<Chunk<scalar_t>*>(a.grad + e0) = grad_out;
    if (store_loss) *reinterpret_cast<Chunk<scalar_t>*>(a.loss_none + e0) = loss_out;
    return sum;
  }

  // A group the row's start or end cuts (at most two per row): its elements in the row one at a
  // time, not unrolled, so that this rare path needs no more registers than the vector one.
  template <bool kMaybePositive, bool kClassWeight>
  __device__ __forceinline__ math_t partial_group(int64_t e0, int32_t col) const {
    const int32_t c = static_cast<int32_t>(a.params.num_classes);
    Philox4 bits{{0, 0, 0, 0}};
    if (draws) bits = philox_group(e0 >> 2, round_keys);
    math_t sum = 0;
#pragma unroll 1
    for (int k = 0; k < kChunk; ++k) {
      if (col + k < 0 || col + k >= c) continue;
      // A select, not bits.w[k]: a runtime index would put the words in local memory.
      const uint32_t word =
          k == 0 ? bits.w[0] : k == 1 ? bits.w[1] : k == 2 ? bits.w[2] : bits.w[3];
      math_t d;
      const math_t l = weighted<kMaybePositive, kClassWeight>(
          a.logits[e0 + k], col + k, dropped<kMaybePositive>(col + k, word), &d);
      sum += l;
      if (store_loss) a.loss_none[e0 + k] = from_math<scalar_t>(l);
      if (store_grad) a.grad[e0 + k] = from_math<scalar_t>(d);
    }
    return sum;
  }

  // Every group of the row, a lane each: whole groups take the vector path (the host makes the
  // logits 16-byte aligned), the partial first and last ones the element-wise one. Returns this
  // lane's loss sum of the row.
  template <bool kBackground, bool kClassWeight>
  __device__ __forceinline__ math_t row_groups(int64_t row_start, int lane) const {
    // Columns in 32 bits: the first group starts 0-3 columns before the row.
    const int32_t c = static_cast<int32_t>(a.params.num_classes);
    math_t sum = 0;
    for (int32_t col = lane * kChunk - static_cast<int32_t>(row_start & (kChunk - 1)); col < c;
         col += kWarp * kChunk) {
      const int64_t e0 = row_start + col;
      const bool whole = col >= 0 && col + kChunk <= c;
      const bool maybe_positive =
          !kBackground && static_cast<uint32_t>(positive_col - col) < kChunk;
      if (whole && !maybe_positive) {
        sum += group<false, kClassWeight>(e0, col);
      } else if (whole) {
        sum += GK_OFF_COMMON_PATH(group<true, kClassWeight>(e0, col));
      } else {
        sum += GK_OFF_COMMON_PATH(partial_group<!kBackground, kClassWeight>(e0, col));
      }
    }
    return sum;
  }
};

// Loss and gradient of one whole row (the warp's). kBackground: a background row (else a
// foreground row).
template <typename scalar_t, MathKind kMath, GradMode kGrad, bool kBackground>
__device__ __forceinline__ math_type_t<scalar_t> gol_row(
    const RowsArgs<scalar_t>& a, const CallConstants<math_type_t<scalar_t>>& call,
    const PhiloxRoundKeys& round_keys, int64_t row, const RowFact<math_type_t<scalar_t>>& fact,
    int lane) {
  using math_t = math_type_t<scalar_t>;
  const GolParams& p = a.params;
  const RowContext<scalar_t, kMath, kGrad> context{
      a, static_cast<math_t>(p.clamp_min), static_cast<math_t>(p.clamp_max), fact.scale,
      math_t(0) * fact.scale, fact.scale * call.inv_denominator, call.inv_denominator,
      GK_ON_COMMON_PATH(false, !kBackground && call.drops_foreground),
      GK_ON_COMMON_PATH(true, kBackground && call.drop_background),
      GK_ON_COMMON_PATH(true, a.grad != nullptr),
      GK_ON_COMMON_PATH(false, a.loss_none != nullptr),
      call.threshold,
      kBackground ? -1 : fact.code, round_keys};
  const int64_t row_start = row * p.num_classes;
  return a.class_weight != nullptr
             ? GK_OFF_COMMON_PATH(
                   context.template row_groups<kBackground, true>(row_start, lane))
             : context.template row_groups<kBackground, false>(row_start, lane);
}

// A row whose loss and gradient are 0 (ignored) or NaN (a bad label, reported on the host
// unless GUMBEL_CUDA_CHECK_LABELS=0 or a capture skips the check).
template <typename scalar_t>
__device__ __forceinline__ void fill_row(const RowsArgs<scalar_t>& a, int64_t row, int lane,
                                         math_type_t<scalar_t> value) {
  const int64_t c = a.params.num_classes;
  const scalar_t fill = from_math<scalar_t>(value);
  for (int64_t j = lane; j < c; j += kWarp) {
    if (a.grad != nullptr) a.grad[row * c + j] = fill;
    if (a.loss_none != nullptr) a.loss_none[row * c + j] = fill;
  }
}

// The loss's last step, by the last block to finish: the per-block partials added in block
// order (and divided by the valid rows for "mean"). The ticket's atomic and the fences order
// every block's partial before the last block reads it.
template <typename math_t>
__device__ void finish_loss(double block_total, double* __restrict__ partials,
                            CallHeader* __restrict__ header, const GolParams& p,
                            math_t* __restrict__ loss, double* shared) {
  __shared__ bool last;
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = block_total;
    __threadfence();
    last = atomicAdd(&header->ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  double sum = 0.0;
  for (unsigned int b = threadIdx.x; b < gridDim.x; b += blockDim.x) {
    sum += static_cast<volatile double*>(partials)[b];
  }
  const double total = block_sum<double>(sum, shared);
  if (threadIdx.x == 0 && loss != nullptr) {
    const unsigned long long valid = header->valid;
    *loss = static_cast<math_t>(
        p.reduction == Reduction::kMean ? total / static_cast<double>(valid > 0 ? valid : 1ull)
                                        : total);
  }
}

// The fused pass (see the top): warps walk rows in a grid-stride loop.
// kSeedOnDevice: the Philox key is read from a.device_seed (else it is a kernel parameter, which
// keeps the 20 round keys in uniform registers: a separate instantiation, not a branch).
template <typename scalar_t, MathKind kMath, GradMode kGrad, bool kSeedOnDevice>
__global__ void __launch_bounds__(kThreads, (min_blocks_per_sm<scalar_t, kMath>()))
    gol_rows_kernel(const RowsArgs<scalar_t> a) {
  using math_t = math_type_t<scalar_t>;
  __shared__ double shared[kThreads];
  const GolParams& p = a.params;
  const CallConstants<math_t> call(*a.header, p, a.has_drop);
  // The round keys: the host's (kernel parameters), or those of the seed read on the device.
  PhiloxRoundKeys device_round_keys;
  if constexpr (kSeedOnDevice) {
    device_round_keys = philox_round_keys(resolve_philox_key(p.philox, a.device_seed));
  }
  const PhiloxRoundKeys& round_keys = kSeedOnDevice ? device_round_keys : a.round_keys;
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const math_t nan = std::numeric_limits<math_t>::quiet_NaN();
  math_t sum = 0;
  // Rows in 32 bits (N < 2^31; the flat indices are 64-bit).
  const int32_t rows = static_cast<int32_t>(p.num_rows);
  for (int32_t row = static_cast<int32_t>(blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp);
       row < rows; row += static_cast<int32_t>(gridDim.x * kWarpsPerBlock)) {
    const RowFact<math_t> fact = a.rows[row];
    if (fact.code == kIgnoredRow) {
      GK_OFF_COMMON_PATH(fill_row(a, row, lane, math_t(0)));
    } else if (fact.code == kBadLabelRow) {
      GK_OFF_COMMON_PATH(fill_row(a, row, lane, nan));
      sum += nan;
    } else if (fact.code == kBackgroundRow) {
      sum += gol_row<scalar_t, kMath, kGrad, true>(a, call, round_keys, row, fact,
                                                                lane);
    } else {
      sum += GK_OFF_COMMON_PATH(
          gol_row<scalar_t, kMath, kGrad, false>(a, call, round_keys, row, fact,
                                                                lane));
    }
  }
  const double block_total = block_sum<double>(static_cast<double>(sum), shared);
  finish_loss<math_t>(block_total, a.partials, a.header, p, a.loss, shared);
}

// ---------------------------------------------------------------------------------------------
// gumbel::gol_loss_class_stats. Each block owns kStatsRows consecutive rows and each thread
// whole columns of them (j = threadIdx.x + k * blockDim.x), walking down its rows: the warp's
// loads stay coalesced, and a thread sums its columns' |gradient| alone, in row order, so the
// per-block column partials need no atomics. sum_class_stats_kernel adds the partials of a
// column in block order: the statistics and the loss are bit-reproducible. A drop-class
// negative of a background row draws its own Philox call (word e & 3 of call e >> 2); EQLv2,
// the user, runs mode "bce" and draws none.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) gol_loss_class_stats_kernel(
    const scalar_t* __restrict__ logits, const RowFact<math_type_t<scalar_t>>* __restrict__ rows,
    const uint8_t* __restrict__ drop_flags, const math_type_t<scalar_t>* __restrict__ class_weight,
    const math_type_t<scalar_t>* __restrict__ pos_weight, const CallHeader* __restrict__ header,
    const int64_t* __restrict__ device_seed, GolParams p, scalar_t* __restrict__ grad,
    double* __restrict__ loss_partials, double* __restrict__ stat_partials) {
  using math_t = math_type_t<scalar_t>;
  __shared__ double shared[kThreads];
  const CallConstants<math_t> call(*header, p, drop_flags != nullptr);
  const math_t nan = std::numeric_limits<math_t>::quiet_NaN();
  const PhiloxKey key = resolve_philox_key(p.philox, device_seed);
  const int64_t c = p.num_classes;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * kStatsRows;
  const int64_t row_end = row_begin + kStatsRows < p.num_rows ? row_begin + kStatsRows : p.num_rows;
  double* pos_partial = stat_partials + static_cast<int64_t>(blockIdx.x) * 2 * c;
  double* neg_partial = pos_partial + c;
  double sum = 0.0;
  for (int64_t j = threadIdx.x; j < c; j += blockDim.x) {
    const math_t cw = class_weight != nullptr ? class_weight[j] : math_t(1);
    const math_t pw = pos_weight != nullptr ? pos_weight[j] : cw;
    const bool is_drop = drop_flags != nullptr && drop_flags[j] != 0;
    double pos_sum = 0.0, neg_sum = 0.0;
    for (int64_t row = row_begin; row < row_end; ++row) {
      const int64_t e = row * c + j;
      const RowFact<math_t> fact = rows[row];
      math_t l = 0, g = 0;
      if (fact.code == kBadLabelRow) {
        l = nan;
        g = nan;
      } else if (fact.code != kIgnoredRow) {
        const bool positive = fact.code == j;
        const bool background = fact.code == kBackgroundRow;
        const bool dropped =
            !positive && is_drop &&
            (background ? call.drop_background &&
                              philox_group(e >> 2, key).w[e & 3] > call.threshold
                        : call.drops_foreground);
        math_t el, eg;
        element_loss_grad<math_t>(p, to_math(logits[e]), positive, &el, &eg);
        const math_t w = (dropped ? math_t(0) * (positive ? pw : cw) : (positive ? pw : cw)) *
                         fact.scale;
        l = w * el;
        g = w * eg;  // of the summed loss
        (positive ? pos_sum : neg_sum) += fabs(static_cast<double>(g));
      }
      sum += static_cast<double>(l);
      grad[e] = from_math<scalar_t>(g * call.inv_denominator);
    }
    pos_partial[j] = pos_sum;
    neg_partial[j] = neg_sum;
  }
  const double block_total = block_sum<double>(sum, shared);
  if (threadIdx.x == 0) loss_partials[blockIdx.x] = block_total;
}

// The partials added in a fixed order (one block), so the loss is bit-identical run to run.
template <typename out_t>
__global__ void sum_partials_kernel(const double* __restrict__ partials, int64_t count,
                                    const CallHeader* __restrict__ header, bool mean,
                                    out_t* __restrict__ loss) {
  __shared__ double shared[kThreads];
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) sum += partials[i];
  const double total = block_sum<double>(sum, shared);
  if (threadIdx.x == 0) {
    const unsigned long long valid = header->valid;
    *loss = static_cast<out_t>(mean ? total / static_cast<double>(valid > 0 ? valid : 1ull)
                                    : total);
  }
}

// Column j of the statistics: its per-block partials added in block order.
__global__ void sum_class_stats_kernel(const double* __restrict__ stat_partials,
                                       int64_t num_blocks, int64_t c, double* __restrict__ pos,
                                       double* __restrict__ neg) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= c) return;
  double pos_sum = 0.0, neg_sum = 0.0;
  for (int64_t b = 0; b < num_blocks; ++b) {
    pos_sum += stat_partials[b * 2 * c + j];
    neg_sum += stat_partials[b * 2 * c + c + j];
  }
  pos[j] = pos_sum;
  neg[j] = neg_sum;
}

template <typename scalar_t>
__global__ void gumbel_activation_kernel(const scalar_t* __restrict__ q, scalar_t* __restrict__ out,
                                         int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const math_type_t<scalar_t> x = to_math(q[i]);
    out[i] = from_math<scalar_t>(exp(-exp(-x)));
  }
}

// grad *= *scale, where the check "scale == 1" happens on the device: no host sync. The scale
// is read in its own dtype (the loss's: float or double), with no conversion launch.
template <typename scalar_t, typename scale_t>
__global__ void scale_grad_kernel(scalar_t* __restrict__ grad, const scale_t* __restrict__ scale,
                                  int64_t n) {
  using math_t = math_type_t<scalar_t>;
  const math_t s = static_cast<math_t>(*scale);
  if (s == math_t(1)) return;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    grad[i] = from_math<scalar_t>(to_math(grad[i]) * s);
  }
}

}  // namespace cuda
}  // namespace gk
