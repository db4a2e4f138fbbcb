// CUDA implementation of gumbel::gol_loss, gumbel::gol_loss_class_stats,
// gumbel::gumbel_activation and gumbel::scale_grad_.
//
// Three launches on the current stream, no host sync on the default path except the label
// check (see check_labels_on_host):
//   1. count_labels_kernel (one block): #valid rows, #foreground rows, #foreground rows of a drop
//      class, and the first out-of-range label; the DropLoss ratio and the mean's denominator
//      are derived from these on the device.
//   2. gol_loss_kernel: one pass over the flat N*C logits, four elements (one Philox call, one
//      128-bit load for float32) per thread step, int64 indices; loss and gradient from
//      csrc/gol_math.h, the same element math the CPU kernel runs; a double partial per block.
//   3. sum_partials_kernel (one block): the partials added in a fixed order, so the loss is
//      bit-identical run to run (no float atomics anywhere).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../gol_checks.h"
#include "../gol_math.h"

namespace gk {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kChunk = 4;  // flat elements per thread step: one Philox call, one vector load
constexpr int64_t kNoBadLabel = std::numeric_limits<int64_t>::max();

struct LabelCounts {
  int64_t valid;
  int64_t foreground;
  int64_t foreground_drop;
  int64_t first_bad;  // index of the first label outside [0, C] and not ignore_index
};

// Labels are validated on the host by default (one 8-byte device-to-host copy after the fused
// pass is queued, which waits for it; skipped during CUDA graph capture).
// GUMBEL_CUDA_CHECK_LABELS=0 skips it: then a row with a bad label
// gets NaN loss and gradient instead of an exception, and nothing is read out of bounds either way.
bool check_labels_on_host() {
  static const bool enabled = [] {
    const char* value = std::getenv("GUMBEL_CUDA_CHECK_LABELS");
    return value == nullptr || std::strcmp(value, "0") != 0;
  }();
  return enabled;
}

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
      atomicMin(&first_bad, static_cast<unsigned long long>(i));  // integer min: order-free
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

template <typename scalar_t, typename math_t, bool kVectorized>
__global__ void __launch_bounds__(kThreads) gol_loss_kernel(
    const scalar_t* __restrict__ logits, const int64_t* __restrict__ labels,
    const bool* __restrict__ drop, const math_t* __restrict__ class_weight,
    const math_t* __restrict__ row_weight, const LabelCounts* __restrict__ counts, GolParams p,
    scalar_t* __restrict__ grad, scalar_t* __restrict__ loss_none,
    double* __restrict__ partials) {
  __shared__ double shared[kThreads];
  const int64_t c = p.num_classes;
  const int64_t total = p.num_rows * c;
  const int64_t num_groups = (total + kChunk - 1) / kChunk;

  const CallConstants<math_t> call(*counts, p, drop != nullptr);
  const bool drops_foreground = call.drops_foreground;
  const bool drop_background = call.drop_background;
  const math_t inv_denominator = call.inv_denominator;
  const math_t nan = std::numeric_limits<math_t>::quiet_NaN();

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
      for (int k = 0; k < kChunk; ++k) in.v[k] = e0 + k < total ? logits[e0 + k] : scalar_t(0);
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
      if (needed) bits = philox_group(g, p.philox);
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
              w = math_t(0);
            }
            const math_t rw = row_weight != nullptr ? row_weight[row] : math_t(1);
            math_t el, eg;
            element_loss_grad<math_t>(p, static_cast<math_t>(in.v[k]), positive, &el, &eg);
            l = w * el * rw;
            d = w * eg * (rw * inv_denominator);
          }
        }
        sum += static_cast<double>(l);
      }
      grad_out.v[k] = static_cast<scalar_t>(d);
      loss_out.v[k] = static_cast<scalar_t>(l);
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

int multiprocessor_count() {
  constexpr int kMaxDevices = 64;
  static int cached[kMaxDevices] = {};  // 0: not queried yet (benign race: same value)
  const int device = c10::cuda::current_device();
  if (device < kMaxDevices && cached[device] > 0) return cached[device];
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if (device < kMaxDevices) cached[device] = sms;
  return sms;
}

int64_t grid_size(int64_t work_items) {
  const int64_t blocks = (work_items + kThreads - 1) / kThreads;
  const int sms = multiprocessor_count();
  // A fixed grid per (device, shape) keeps the partials, and so the loss bits, reproducible.
  return std::max<int64_t>(1, std::min<int64_t>(blocks, static_cast<int64_t>(sms) * 8));
}

// The labels pre-pass (count_labels_kernel) into a fresh 4 x int64 workspace (a LabelCounts).
at::Tensor launch_count_labels(const GolInputs& in, cudaStream_t stream) {
  at::Tensor workspace = at::empty({4}, in.labels.options());
  const GolParams& p = in.params;
  const bool* drop = in.drop_classes.defined() ? in.drop_classes.data_ptr<bool>() : nullptr;
  count_labels_kernel<<<1, kThreads, 0, stream>>>(
      in.labels.data_ptr<int64_t>(), drop, p.num_rows, p.num_classes, p.ignore_index,
      reinterpret_cast<LabelCounts*>(workspace.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return workspace;
}

// Called after the launches so that the copy overlaps the fused pass; not while a CUDA graph
// is being captured (a device-to-host copy is not allowed there: bad rows stay NaN).
void raise_on_bad_label(const GolInputs& in, const at::Tensor& workspace, cudaStream_t stream) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone || !check_labels_on_host()) return;
  const int64_t first_bad = workspace[3].item<int64_t>();
  if (first_bad != kNoBadLabel) {
    const GolParams& p = in.params;
    const int64_t value = in.labels[first_bad].item<int64_t>();
    TORCH_CHECK_VALUE(false, "gol_loss: labels[", first_bad, "] = ", value,
                      " is out of range: expected a class in [0, ", p.num_classes - 1, "], ",
                      p.num_classes, " for background, or ignore_index=", p.ignore_index);
  }
}

std::tuple<at::Tensor, at::Tensor> gol_loss_cuda(
    const at::Tensor& logits, const at::Tensor& labels,
    const std::optional<at::Tensor>& drop_classes, const std::optional<at::Tensor>& class_weight,
    const std::optional<at::Tensor>& row_weight, const at::Tensor& seed, int64_t offset,
    c10::string_view mode, c10::string_view activation, c10::string_view reduction,
    std::optional<double> clamp_min, std::optional<double> clamp_max, c10::string_view grad_mode,
    int64_t ignore_index, bool need_grad) {
  const GolInputs in = prepare_gol_inputs(logits, labels, drop_classes, class_weight, row_weight,
                                          seed, offset, mode, activation, reduction, clamp_min,
                                          clamp_max, grad_mode, ignore_index, need_grad);
  const c10::cuda::CUDAGuard guard(in.logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor loss = allocate_loss(in);
  at::Tensor grad = allocate_grad(in);
  const GolParams& p = in.params;
  if (p.num_rows == 0) {
    loss.zero_();
    return {loss, grad};
  }
  const at::Tensor workspace = launch_count_labels(in, stream);
  auto* counts = reinterpret_cast<const LabelCounts*>(workspace.data_ptr<int64_t>());
  const bool* drop = in.drop_classes.defined() ? in.drop_classes.data_ptr<bool>() : nullptr;
  const int64_t total = p.num_rows * p.num_classes;
  const int64_t blocks = grid_size((total + kChunk - 1) / kChunk);
  at::Tensor partials = at::empty({blocks}, in.logits.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.logits.scalar_type(), "gol_loss_cuda", [&] {
    using math_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* q = in.logits.data_ptr<scalar_t>();
    scalar_t* g = p.need_grad ? grad.data_ptr<scalar_t>() : nullptr;
    scalar_t* l = p.reduction == Reduction::kNone ? loss.data_ptr<scalar_t>() : nullptr;
    const math_t* cw = in.class_weight.defined() ? in.class_weight.data_ptr<math_t>() : nullptr;
    const math_t* rw = in.row_weight.defined() ? in.row_weight.data_ptr<math_t>() : nullptr;
    constexpr size_t kAlign = sizeof(Chunk<scalar_t>);
    const bool aligned = reinterpret_cast<uintptr_t>(q) % kAlign == 0 &&
                         (g == nullptr || reinterpret_cast<uintptr_t>(g) % kAlign == 0) &&
                         (l == nullptr || reinterpret_cast<uintptr_t>(l) % kAlign == 0);
    if (aligned) {
      gol_loss_kernel<scalar_t, math_t, true><<<blocks, kThreads, 0, stream>>>(
          q, in.labels.data_ptr<int64_t>(), drop, cw, rw, counts, p, g, l,
          partials.data_ptr<double>());
    } else {
      gol_loss_kernel<scalar_t, math_t, false><<<blocks, kThreads, 0, stream>>>(
          q, in.labels.data_ptr<int64_t>(), drop, cw, rw, counts, p, g, l,
          partials.data_ptr<double>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (p.reduction != Reduction::kNone) {
      sum_partials_kernel<math_t><<<1, kThreads, 0, stream>>>(
          partials.data_ptr<double>(), blocks, counts, p.reduction == Reduction::kMean,
          loss.data_ptr<math_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  raise_on_bad_label(in, workspace, stream);
  return {loss, grad};
}

// gumbel::gol_loss_class_stats. Each block owns kStatsRows consecutive rows and each thread
// whole columns of them (j = threadIdx.x + k * blockDim.x), walking down its rows: the warp's
// loads stay coalesced, and a thread sums its columns' |gradient| alone, in row order, so the
// per-block column partials need no atomics. A second kernel adds the partials of a column in
// block order: the statistics and the loss are bit-reproducible. One Philox call per element
// (word e & 3 of call e >> 2); EQLv2, the user, runs mode "bce" and draws none.
constexpr int64_t kStatsRows = 64;

template <typename scalar_t, typename math_t>
__global__ void __launch_bounds__(kThreads) gol_loss_class_stats_kernel(
    const scalar_t* __restrict__ logits, const int64_t* __restrict__ labels,
    const bool* __restrict__ drop, const math_t* __restrict__ class_weight,
    const math_t* __restrict__ pos_weight, const math_t* __restrict__ row_weight,
    const LabelCounts* __restrict__ counts, GolParams p, scalar_t* __restrict__ grad,
    double* __restrict__ loss_partials, double* __restrict__ stat_partials) {
  __shared__ double shared[kThreads];
  const CallConstants<math_t> call(*counts, p, drop != nullptr);
  const math_t nan = std::numeric_limits<math_t>::quiet_NaN();
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
                return uniform_from_bits(philox_group(e >> 2, p.philox).w[e & 3]);
              })) {
            w = math_t(0);
          }
          const math_t rw = row_weight != nullptr ? row_weight[row] : math_t(1);
          math_t el, eg;
          element_loss_grad<math_t>(p, static_cast<math_t>(logits[e]), positive, &el, &eg);
          l = w * el * rw;
          g = w * eg * rw;  // of the summed loss
          (positive ? pos_sum : neg_sum) += fabs(static_cast<double>(g));
        }
      }
      sum += static_cast<double>(l);
      grad[e] = static_cast<scalar_t>(g * call.inv_denominator);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gol_loss_class_stats_cuda(
    const at::Tensor& logits, const at::Tensor& labels,
    const std::optional<at::Tensor>& drop_classes, const std::optional<at::Tensor>& class_weight,
    const std::optional<at::Tensor>& pos_weight, const std::optional<at::Tensor>& row_weight,
    const at::Tensor& seed, int64_t offset, c10::string_view mode, c10::string_view activation,
    c10::string_view reduction, std::optional<double> clamp_min, std::optional<double> clamp_max,
    c10::string_view grad_mode, int64_t ignore_index) {
  const GolInputs in = prepare_class_stats_inputs(
      logits, labels, drop_classes, class_weight, pos_weight, row_weight, seed, offset, mode,
      activation, reduction, clamp_min, clamp_max, grad_mode, ignore_index);
  const c10::cuda::CUDAGuard guard(in.logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor loss = allocate_loss(in);
  at::Tensor grad = allocate_grad(in);
  at::Tensor pos_stats = allocate_class_stat(in);
  at::Tensor neg_stats = allocate_class_stat(in);
  const GolParams& p = in.params;
  if (p.num_rows == 0) {
    loss.zero_();
    return {loss, grad, pos_stats, neg_stats};
  }
  const at::Tensor workspace = launch_count_labels(in, stream);
  auto* counts = reinterpret_cast<const LabelCounts*>(workspace.data_ptr<int64_t>());
  const bool* drop = in.drop_classes.defined() ? in.drop_classes.data_ptr<bool>() : nullptr;
  const int64_t blocks = (p.num_rows + kStatsRows - 1) / kStatsRows;
  at::Tensor loss_partials = at::empty({blocks}, in.logits.options().dtype(at::kDouble));
  at::Tensor stat_partials =
      at::empty({blocks, 2, p.num_classes}, in.logits.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.logits.scalar_type(), "gol_loss_class_stats_cuda", [&] {
    using math_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    auto vector = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<math_t>() : nullptr; };
    gol_loss_class_stats_kernel<scalar_t, math_t><<<blocks, kThreads, 0, stream>>>(
        in.logits.data_ptr<scalar_t>(), in.labels.data_ptr<int64_t>(), drop,
        vector(in.class_weight), vector(in.pos_weight), vector(in.row_weight), counts, p,
        grad.data_ptr<scalar_t>(), loss_partials.data_ptr<double>(),
        stat_partials.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_partials_kernel<math_t><<<1, kThreads, 0, stream>>>(
        loss_partials.data_ptr<double>(), blocks, counts, p.reduction == Reduction::kMean,
        loss.data_ptr<math_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  sum_class_stats_kernel<<<(p.num_classes + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      stat_partials.data_ptr<double>(), blocks, p.num_classes, pos_stats.data_ptr<double>(),
      neg_stats.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  raise_on_bad_label(in, workspace, stream);
  return {loss, grad, pos_stats, neg_stats};
}

template <typename scalar_t>
__global__ void gumbel_activation_kernel(const scalar_t* __restrict__ q, scalar_t* __restrict__ out,
                                         int64_t n) {
  using math_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const math_t x = static_cast<math_t>(q[i]);
    out[i] = static_cast<scalar_t>(exp(-exp(-x)));
  }
}

at::Tensor gumbel_activation_cuda(const at::Tensor& logits) {
  TORCH_CHECK_TYPE(at::isFloatingType(logits.scalar_type()),
                   "gumbel_activation: logits must be a floating tensor, got ", logits.scalar_type());
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gumbel_activation_cuda", [&] {
    gumbel_activation_kernel<scalar_t><<<grid_size(n), kThreads, 0,
                                         c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// grad *= *scale, where the check "scale == 1" happens on the device: no host sync.
template <typename scalar_t, typename scale_t>
__global__ void scale_grad_kernel(scalar_t* __restrict__ grad, const scale_t* __restrict__ scale,
                                  int64_t n) {
  using math_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const math_t s = static_cast<math_t>(*scale);
  if (s == math_t(1)) return;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    grad[i] = static_cast<scalar_t>(static_cast<math_t>(grad[i]) * s);
  }
}

void scale_grad_cuda(at::Tensor& grad, const at::Tensor& grad_output) {
  const c10::cuda::CUDAGuard guard(grad.device());
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
    scale_grad_kernel<scalar_t, double><<<grid_size(n), kThreads, 0,
                                          c10::cuda::getCurrentCUDAStream()>>>(
        grad.data_ptr<scalar_t>(), scale.data_ptr<double>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace cuda
}  // namespace gk

TORCH_LIBRARY_IMPL(gumbel, CUDA, m) {
  m.impl("gol_loss", &gk::cuda::gol_loss_cuda);
  m.impl("gol_loss_class_stats", &gk::cuda::gol_loss_class_stats_cuda);
  m.impl("gumbel_activation", &gk::cuda::gumbel_activation_cuda);
  m.impl("scale_grad_", &gk::cuda::scale_grad_cuda);
}
