// at::vec::Vectorized<float> plugged into the element math of gol_math.h, so the CPU kernel's
// SIMD body runs exactly the formulas the scalar (and CUDA) instantiations run.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include "../gol_math.h"
#include "vec_math.h"

namespace gk {
namespace cpu {

// kLean: the element math only ever takes exp of arguments that cannot overflow and log of
// normal positive numbers, except for non-finite logits, which the poison term surfaces anyway
// (the kernel picks it when the clamp keeps t = exp(-q) a normal float).
template <bool kLean>
struct VecOpsT {
  using V = at::vec::Vectorized<float>;
  using M = V;  // comparison results are all-ones / all-zeros lanes
  static V splat(float x) { return V(x); }
  static V exp(const V& x) { return kLean ? fast_exp_lean(x) : fast_exp(x); }
  static V exp_neg_bounded(const V& x) { return fast_exp_bounded(x.neg()); }
  static V exp_neg_small(const V& x) { return fast_exp_bounded(x.neg()); }
  static V recip(const V& x) { return V(1.0f) / x; }
  static V fma(const V& a, const V& b, const V& c) { return at::vec::fmadd(a, b, c); }
  // NaN-dropping min/max (maxps/minps return the second operand on NaN); see ScalarOps.
  static V min(const V& a, const V& b) { return min_drop_nan(a, b); }
  static V max(const V& a, const V& b) { return max_drop_nan(a, b); }
  static V log(const V& x) { return kLean ? fast_log_lean(x) : fast_log(x); }
  // log1p(x) = log(u) * x / (u - 1) with u = 1 + x (Goldberg): exact rounding of u cancels.
  static V log1p(const V& x) {
    const V u = x + V(1.0f);
    const V d = u - V(1.0f);
    return V::blendv(log(u) * x / d, x, d == V(0.0f));
  }
  // 1 - exp(-t) given p = exp(-t): a Taylor polynomial below t = 1/4, where 1 - p would cancel
  // (relative error < 1e-7 on both sides of the switch).
  static V one_minus_exp_neg(const V& t, const V& p) {
    V series = V(-1.0f / 720.0f);
    series = at::vec::fmadd(series, t, V(1.0f / 120.0f));
    series = at::vec::fmadd(series, t, V(-1.0f / 24.0f));
    series = at::vec::fmadd(series, t, V(1.0f / 6.0f));
    series = at::vec::fmadd(series, t, V(-0.5f));
    series = at::vec::fmadd(series, t, V(1.0f));
    return V::blendv(V(1.0f) - p, series * t, t < V(0.25f));
  }
  static V neg(const V& x) { return x.neg(); }
  static V abs(const V& x) { return x.abs(); }
  static M lt(const V& a, const V& b) { return a < b; }
  static M gt(const V& a, const V& b) { return a > b; }
  static M both(const M& a, const M& b) { return a & b; }
  static V select(const M& m, const V& a, const V& b) { return V::blendv(b, a, m); }
  // Lane k of x set to 0 where bit k of `bits` is set.
  static V zero_lanes(const V& x, uint32_t bits) {
#if defined(CPU_CAPABILITY_AVX2)
    const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i hit = _mm256_cmpeq_epi32(
        _mm256_and_si256(_mm256_set1_epi32(static_cast<int32_t>(bits)), lane_bit), lane_bit);
    return _mm256_andnot_ps(_mm256_castsi256_ps(hit), x);
#else
    float lanes[V::size()];
    x.store(lanes);
    for (int k = 0; k < V::size(); ++k) {
      if ((bits >> k) & 1) lanes[k] = 0.0f;
    }
    return V::loadu(lanes);
#endif
  }
};

}  // namespace cpu
}  // namespace gk
