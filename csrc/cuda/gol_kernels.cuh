// The CUDA device code of gumbel::gol_loss, gol_loss_class_stats, gumbel_activation and
// scale_grad_: kernels and their device helpers, free of torch types.
//
// It includes only gol_math.h and the standard library, so that it compiles twice: by nvcc for
// the GPU (csrc/cuda/gol_loss_kernel.cu, after <cuda_fp16.h>/<cuda_bf16.h>), and as host C++
// under the emulation runtime (csrc/cuda_emulation/runtime.h), which runs every CUDA thread of a
// block as an OS thread so that the CPU tests, ASan/UBSan and TSan see exactly this code. The
// host side (grid sizes, launches, the label check) is csrc/cuda/gol_host.h, also shared.
//
// Element types: float, double, __half and __nv_bfloat16 (the host maps at::Half/at::BFloat16
// onto the last two); the math runs in float (double for double).
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

#include "../gol_math.h"

namespace gk {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kChunk = 4;  // flat elements per thread step: one Philox call, one vector load
constexpr int64_t kNoBadLabel = std::numeric_limits<int64_t>::max();
// gol_loss_class_stats: rows per block (each block sums its rows' statistics per column).
constexpr int64_t kStatsRows = 64;

struct LabelCounts {
  int64_t valid;
  int64_t foreground;
  int64_t foreground_drop;
  int64_t first_bad;  // index of the first label outside [0, C] and not ignore_index
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

// The labels pre-pass, one block: #valid rows, #foreground rows, #foreground rows of a drop
// class, and the first out-of-range label (integer atomics only: order-free).
__global__ void count_labels_kernel(const int64_t* __restrict__ labels,
                                    const bool* __restrict__ drop, int64_t n, int64_t c,
                                    int64_t ignore_index, LabelCounts* __restrict__ out) {
  __shared__ long long shared[kThreads];
  __shared__ unsigned long long first_bad;
  if (threadIdx.x == 0) first_bad = static_cast<unsigned long long>(kNoBadLabel);
  __syncthreads();
  long long valid = 0, foreground = 0, foreground_drop = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int64_t label = labels[i];
    if (label == ignore_index) continue;
    if (label < 0 || label > c) {
      atomicMin(&first_bad, static_cast<unsigned long long>(i));
      continue;
    }
    ++valid;
    if (label < c) {
      ++foreground;
      if (drop != nullptr && drop[label]) ++foreground_drop;
    }
  }
  valid = block_sum<long long>(valid, shared);
  foreground = block_sum<long long>(foreground, shared);
  foreground_drop = block_sum<long long>(foreground_drop, shared);
  if (threadIdx.x == 0) {
    out->valid = valid;
    out->foreground = foreground;
    out->foreground_drop = foreground_drop;
    out->first_bad = static_cast<int64_t>(first_bad);
  }
}

// Loss and gradient of one element, unweighted.
template <typename math_t>
__device__ __forceinline__ void element_loss_grad(const GolParams& p, math_t q, bool positive,
                                                  math_t* loss, math_t* grad) {
  using Math = ElementMath<ScalarOps<math_t>>;
  if (p.activation == Activation::kSigmoid) {
    Math::sigmoid(q, positive, loss, grad);
    return;
  }
  const math_t lo = p.clamp_min, hi = p.clamp_max;
  if (!positive) {
    if constexpr (std::is_same_v<math_t, float>) {
      // The same choice as the CPU kernel's (csrc/cpu/gol_loss_kernel.cpp, choose_path): uniform
      // over the launch, so no divergence.
      if (clamp_is_bounded(p.clamp_min, p.clamp_max)) {
        Math::gumbel_negative_bounded(q, lo, hi, p.grad_mode, loss, grad);
      } else {
        Math::gumbel_negative_series(q, lo, hi, p.grad_mode, loss, grad);
      }
    } else {
      Math::gumbel_negative(Math::gumbel(q, lo, hi), p.grad_mode, loss, grad);
    }
  } else {
    Math::gumbel_positive(Math::gumbel(q, lo, hi), p.grad_mode, loss, grad);
  }
}

// What a call's label statistics (from the pre-pass, no host round trip) fix for every element.
template <typename math_t>
struct CallConstants {
  bool drops_foreground = false;  // eql/droploss: a foreground row drops drop-class negatives
  bool drop_background = false;   // droploss: background rows draw uniforms
  float ratio = 0.0f;
  math_t inv_denominator = 1;
  __device__ CallConstants(const LabelCounts& counts, const GolParams& p, bool has_drop) {
    drops_foreground = p.mode != Mode::kBce && has_drop;
    if (p.mode == Mode::kDropLoss && has_drop && counts.foreground > 0) {
      ratio = static_cast<float>(counts.foreground_drop) / static_cast<float>(counts.foreground);
      drop_background = ratio < 1.0f;  // u < 1: a ratio of 1 drops nothing
    }
    if (p.reduction == Reduction::kMean) {
      inv_denominator = math_t(1) / static_cast<math_t>(counts.valid > 0 ? counts.valid : 1);
    }
  }
  // Whether a drop-class negative is dropped on a foreground / background row; `uniform()`, the
  // element's Philox uniform, is only asked for on background rows that draw.
  template <typename Uniform>
  __device__ bool drops(bool foreground, Uniform uniform) const {
    return foreground ? drops_foreground : drop_background && uniform() > ratio;
  }
};

template <typename scalar_t>
struct alignas(sizeof(scalar_t) * kChunk) Chunk {
  scalar_t v[kChunk];
};

// One pass over the flat N*C logits, kChunk elements (one Philox call, one 128-bit load for
// float32) per thread step, int64 indices; a double partial per block.
template <typename scalar_t, bool kVectorized>
__global__ void __launch_bounds__(kThreads) gol_loss_kernel(
    const scalar_t* __restrict__ logits, const int64_t* __restrict__ labels,
    const bool* __restrict__ drop, const math_type_t<scalar_t>* __restrict__ class_weight,
    const math_type_t<scalar_t>* __restrict__ row_weight, const LabelCounts* __restrict__ counts,
    const int64_t* __restrict__ device_seed, GolParams p, scalar_t* __restrict__ grad,
    scalar_t* __restrict__ loss_none, double* __restrict__ partials) {
  using math_t = math_type_t<scalar_t>;
  __shared__ double shared[kThreads];
  const int64_t c = p.num_classes;
  const int64_t total = p.num_rows * c;
  const int64_t num_groups = (total + kChunk - 1) / kChunk;

  const CallConstants<math_t> call(*counts, p, drop != nullptr);
  const bool drops_foreground = call.drops_foreground;
  const bool drop_background = call.drop_background;
  const math_t inv_denominator = call.inv_denominator;
  const math_t nan = std::numeric_limits<math_t>::quiet_NaN();
  const PhiloxKey key = resolve_philox_key(p.philox, device_seed);

  double sum = 0.0;
  // Grid-stride over groups of kChunk flat elements; the (row, column) of a group's first
  // element advances by a fixed step, so there is one 64-bit division per thread, not per group.
  const int64_t first_group = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t step_rows = stride * kChunk / c;
  const int64_t step_cols = stride * kChunk - step_rows * c;
  int64_t group_row = first_group * kChunk / c;
  int64_t group_col = first_group * kChunk - group_row * c;
  for (int64_t g = first_group; g < num_groups; g += stride) {
    const int64_t e0 = g * kChunk;
    const bool full = e0 + kChunk <= total;
    Chunk<scalar_t> in;
    if (kVectorized && full) {
      in = *reinterpret_cast<const Chunk<scalar_t>*>(logits + e0);
    } else {
#pragma unroll
      for (int k = 0; k < kChunk; ++k) in.v[k] = e0 + k < total ? logits[e0 + k] : from_math<scalar_t>(0);
    }
    int64_t row = group_row;
    int64_t j = group_col;
    int64_t label = labels[row];
    // Philox only where a background row of this group can drop something.
    Philox4 bits{{0, 0, 0, 0}};
    if (drop_background) {
      bool needed = label == c;
      if (!needed && j + kChunk > c) {  // the group runs into the next row(s)
        needed = c < kChunk || (row + 1 < p.num_rows && labels[row + 1] == c);
      }
      if (needed) bits = philox_group(g, key);
    }

    Chunk<scalar_t> grad_out, loss_out;
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      math_t l = 0, d = 0;
      if (e0 + k < total) {
        if (label != p.ignore_index) {
          if (label < 0 || label > c) {
            l = nan;  // a bad label (reported on the host unless GUMBEL_CUDA_CHECK_LABELS=0)
            d = nan;
          } else {
            const bool positive = label == j;
            math_t w = class_weight != nullptr ? class_weight[j] : math_t(1);
            if (!positive && (drops_foreground || drop_background) && drop[j] &&
                call.drops(label < c, [&] { return uniform_from_bits(bits.w[k]); })) {
              w = math_t(0) * w;  // NaN/Inf weights stay visible, as in the reference
            }
            // The reference's order: (drop * class weight * row weight) * element term.
            w = w * (row_weight != nullptr ? row_weight[row] : math_t(1));
            math_t el, eg;
            element_loss_grad<math_t>(p, to_math(in.v[k]), positive, &el, &eg);
            l = w * el;
            d = w * eg * inv_denominator;
          }
        }
        sum += static_cast<double>(l);
      }
      grad_out.v[k] = from_math<scalar_t>(d);
      loss_out.v[k] = from_math<scalar_t>(l);
      if (++j == c) {
        j = 0;
        ++row;
        if (k + 1 < kChunk && e0 + k + 1 < total) label = labels[row];
      }
    }
    group_col += step_cols;
    group_row += step_rows;
    if (group_col >= c) {
      group_col -= c;
      ++group_row;
    }
    if (kVectorized && full) {
      if (grad != nullptr) *reinterpret_cast<Chunk<scalar_t>*>(grad + e0) = grad_out;
      if (loss_none != nullptr) *reinterpret_cast<Chunk<scalar_t>*>(loss_none + e0) = loss_out;
    } else {
#pragma unroll
      for (int k = 0; k < kChunk; ++k) {
        if (e0 + k >= total) break;
        if (grad != nullptr) grad[e0 + k] = grad_out.v[k];
        if (loss_none != nullptr) loss_none[e0 + k] = loss_out.v[k];
      }
    }
  }
  const double block_total = block_sum<double>(sum, shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = block_total;
}

// The partials added in a fixed order (one block), so the loss is bit-identical run to run.
template <typename out_t>
__global__ void sum_partials_kernel(const double* __restrict__ partials, int64_t count,
                                    const LabelCounts* __restrict__ counts, bool mean,
                                    out_t* __restrict__ loss) {
  __shared__ double shared[kThreads];
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) sum += partials[i];
  const double total = block_sum<double>(sum, shared);
  if (threadIdx.x == 0) {
    const int64_t valid = counts->valid;
    *loss = static_cast<out_t>(mean ? total / static_cast<double>(valid > 0 ? valid : 1) : total);
  }
}

// gumbel::gol_loss_class_stats. Each block owns kStatsRows consecutive rows and each thread
// whole columns of them (j = threadIdx.x + k * blockDim.x), walking down its rows: the warp's
// loads stay coalesced, and a thread sums its columns' |gradient| alone, in row order, so the
// per-block column partials need no atomics. sum_class_stats_kernel adds the partials of a
// column in block order: the statistics and the loss are bit-reproducible. One Philox call per
// element (word e & 3 of call e >> 2); EQLv2, the user, runs mode "bce" and draws none.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) gol_loss_class_stats_kernel(
    const scalar_t* __restrict__ logits, const int64_t* __restrict__ labels,
    const bool* __restrict__ drop, const math_type_t<scalar_t>* __restrict__ class_weight,
    const math_type_t<scalar_t>* __restrict__ pos_weight,
    const math_type_t<scalar_t>* __restrict__ row_weight, const LabelCounts* __restrict__ counts,
    const int64_t* __restrict__ device_seed, GolParams p, scalar_t* __restrict__ grad,
    double* __restrict__ loss_partials, double* __restrict__ stat_partials) {
  using math_t = math_type_t<scalar_t>;
  __shared__ double shared[kThreads];
  const CallConstants<math_t> call(*counts, p, drop != nullptr);
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
    const bool drop_class = drop != nullptr && drop[j];
    double pos_sum = 0.0, neg_sum = 0.0;
    for (int64_t row = row_begin; row < row_end; ++row) {
      const int64_t e = row * c + j;
      const int64_t label = labels[row];
      math_t l = 0, g = 0;
      if (label != p.ignore_index) {
        if (label < 0 || label > c) {
          l = nan;  // a bad label (reported on the host unless GUMBEL_CUDA_CHECK_LABELS=0)
          g = nan;
        } else {
          const bool positive = label == j;
          math_t w = positive ? pw : cw;
          if (!positive && drop_class && call.drops(label < c, [&] {
                return uniform_from_bits(philox_group(e >> 2, key).w[e & 3]);
              })) {
            w = math_t(0) * w;  // NaN/Inf weights stay visible, as in the reference
          }
          w = w * (row_weight != nullptr ? row_weight[row] : math_t(1));
          math_t el, eg;
          element_loss_grad<math_t>(p, to_math(logits[e]), positive, &el, &eg);
          l = w * el;
          g = w * eg;  // of the summed loss
          (positive ? pos_sum : neg_sum) += fabs(static_cast<double>(g));
        }
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

// grad *= *scale, where the check "scale == 1" happens on the device: no host sync.
template <typename scalar_t>
__global__ void scale_grad_kernel(scalar_t* __restrict__ grad, const double* __restrict__ scale,
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
