// Element math of the GOL loss (shared SPEC.md sections 2-4), written once for every compiled
// backend: the CPU kernel instantiates it on scalars and on at::vec vectors, the CUDA kernel on
// scalars in device code. Keeping a single source means the CPU tests check the math the GPU runs.
#pragma once

#include <cstdint>
#include <math.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define GK_HD __host__ __device__ __forceinline__
#else
#define GK_HD inline
#endif

namespace gk {

// torch's binary_cross_entropy clamps log() at -100 and divides its backward by
// max(p (1 - p), 1e-12); GOL trains with it, so the contract keeps both.
constexpr float kLossCap = 100.0f;
constexpr float kBceEps = 1e-12f;
// FLT_MAX: caps t = exp(-q) where a product p t must not become 0 * inf.
constexpr float kLargestFinite = 3.40282347e+38f;

// Clamps inside these bounds take ElementMath::gumbel_negative_bounded (see there).
constexpr float kBoundedClampMin = -4.0f;
constexpr float kBoundedClampMax = 27.0f;
GK_HD bool clamp_is_bounded(float lo, float hi) {
  return lo >= kBoundedClampMin && hi <= kBoundedClampMax;
}

enum class Mode : int32_t { kBce = 0, kEql = 1, kDropLoss = 2 };
enum class Activation : int32_t { kGumbel = 0, kSigmoid = 1 };
enum class Reduction : int32_t { kMean = 0, kSum = 1, kNone = 2 };
enum class GradMode : int32_t { kReference = 0, kExact = 1 };

// ---------------------------------------------------------------------------------------------
// Philox4x32-10 (Random123), the one counter-based stream every backend draws the DropLoss
// uniforms from.
struct PhiloxKey {
  uint32_t key0, key1;        // lo32(seed), hi32(seed)
  uint32_t offset0, offset1;  // lo32(offset), hi32(offset): the third and fourth counter words
};

struct Philox4 {
  uint32_t w[4];
};

GK_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t product = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
#endif
}

// Round r's key words are (key0 + r W0, key1 + r W1). PhiloxKeySchedule adds them up in each
// round (two live words: where a kernel draws per element, as the class-stats kernel);
// PhiloxRoundKeys holds all ten, computed once (the fused kernels: on the GPU they then sit in
// uniform registers or the parameter bank where the rounds use them).
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

struct PhiloxKeySchedule {
  uint32_t key0, key1;
  GK_HD uint32_t k0(int round) const { return key0 + static_cast<uint32_t>(round) * kPhiloxW0; }
  GK_HD uint32_t k1(int round) const { return key1 + static_cast<uint32_t>(round) * kPhiloxW1; }
};

struct PhiloxRoundKeys {
  uint32_t round0[10], round1[10];
  uint32_t offset0, offset1;
  GK_HD uint32_t k0(int round) const { return round0[round]; }
  GK_HD uint32_t k1(int round) const { return round1[round]; }
};

GK_HD PhiloxRoundKeys philox_round_keys(const PhiloxKey& key) {
  const PhiloxKeySchedule schedule{key.key0, key.key1};
  PhiloxRoundKeys keys;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    keys.round0[round] = schedule.k0(round);
    keys.round1[round] = schedule.k1(round);
  }
  keys.offset0 = key.offset0;
  keys.offset1 = key.offset1;
  return keys;
}

// The ten rounds of Philox4x32-10 on a counter, with a key's round keys (either kind above).
template <class Keys>
GK_HD Philox4 philox_rounds(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                            const Keys& keys) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kM0, c0, &hi0);
    const uint32_t lo1 = mulhilo32(kM1, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ keys.k0(round);
    const uint32_t n2 = hi0 ^ c3 ^ keys.k1(round);
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4{{c0, c1, c2, c3}};
}

GK_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                            uint32_t k1) {
  return philox_rounds(c0, c1, c2, c3, PhiloxKeySchedule{k0, k1});
}

// philox4x32_10 of the counter (group, offset) with precomputed round keys.
GK_HD Philox4 philox_group(int64_t group, const PhiloxRoundKeys& keys) {
  const uint64_t g = static_cast<uint64_t>(group);
  return philox_rounds(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), keys.offset0,
                       keys.offset1, keys);
}

// The Philox call that serves flat elements 4g .. 4g+3.
GK_HD Philox4 philox_group(int64_t group, const PhiloxKey& key) {
  const uint64_t g = static_cast<uint64_t>(group);
  return philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), key.offset0,
                       key.offset1, key.key0, key.key1);
}

// Top 24 bits times 2^-24: exact in float32, in [0, 1).
GK_HD float uniform_from_bits(uint32_t bits) {
  return static_cast<float>(bits >> 8) * 5.9604644775390625e-08f;
}

// ---------------------------------------------------------------------------------------------
// Scalar arithmetic for the templated element math. A vector type plugs in by providing the
// same static members (csrc/cpu/vec_ops.h does so for at::vec::Vectorized<float>).
template <typename T>
struct ScalarOps;

// log2(e) split in two floats, and ln 2: exp(x) = 2^(x log2 e).
constexpr float kLog2e = 1.44269502163f;
constexpr float kLog2eLow = 1.92596303e-08f;
constexpr float kLn2 = 0.693147182f;

template <>
struct ScalarOps<float> {
  using V = float;
  using M = bool;
  static GK_HD V splat(float x) { return x; }
  static GK_HD V exp(V x) { return expf(x); }
  // exp(-x) where the result is a normal float (the bounded path's p = exp(-t), 0 < t <= 55):
  // 2^y, y = -x log2(e) rounded, plus 2^y (the rounding error of y) ln 2, the error including
  // log2(e)'s own float rounding. On the GPU 2^y is the MUFU.EX2 approximation: six
  // instructions where expf takes about ten, within ~3 ulp of exp(-x) (tests/test_gol_loss.py
  // sizes its tolerance for 4); on the host (the CUDA emulator) exp2f, the same formula.
  static GK_HD V exp_neg_bounded(V x) {
    const float y = x * kLog2e;  // exp(-x) = 2^-y, y's rounding error carried
    const float error = fmaf(x, kLog2eLow, fmaf(x, kLog2e, -y));
    const float power = exp2_approx(-y);
    return fmaf(power * error, -kLn2, power);
  }

  // The same for |x| <= 27 (t = exp(-qc) of a bounded clamp) without log2(e)'s rounding
  // error: at most 27 * 1.9e-8 in y, which matters only where t is tiny and the loss and
  // gradient do not depend on its last bits (|x| <= 4, where t is large: 7.7e-8, 0.6 ulp).
  static GK_HD V exp_neg_small(V x) {
    const float y = x * kLog2e;
    const float error = fmaf(x, kLog2e, -y);
    const float power = exp2_approx(-y);
    return fmaf(power * error, -kLn2, power);
  }

  static GK_HD float exp2_approx(float y) {
#if defined(__CUDA_ARCH__)
    float power;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(power) : "f"(y));
    return power;
#else
    return exp2f(y);
#endif
  }
  // 1 / x for a normal x of moderate size (the bounded path divides by 1 - p >= 0.63): on the
  // GPU the MUFU.RCP approximation alone, within 1 ulp (no branches: __frcp_rn adds a slow path
  // for special cases, which cannot occur here, and a Newton step for the last half ulp,
  // which the gradient's 1e-5 tolerance does not need); the host (the emulator) divides.
  static GK_HD V recip(V x) {
#if defined(__CUDA_ARCH__)
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
#else
    return V(1) / x;
#endif
  }
  static GK_HD V fma(V a, V b, V c) { return fmaf(a, b, c); }
  // NaN-dropping min/max: callers that use them add gol_math.h's poison term.
  static GK_HD V min(V a, V b) { return fminf(a, b); }
  static GK_HD V max(V a, V b) { return fmaxf(a, b); }
  static GK_HD V one_minus_exp_neg(V t, V /*p*/) { return -expm1f(-t); }
  static GK_HD V log(V x) { return logf(x); }
  static GK_HD V log1p(V x) { return log1pf(x); }
  static GK_HD V neg(V x) { return -x; }
  static GK_HD V abs(V x) { return fabsf(x); }
  static GK_HD M lt(V a, V b) { return a < b; }
  static GK_HD M gt(V a, V b) { return a > b; }
  static GK_HD M both(M a, M b) { return a && b; }
  static GK_HD V select(M m, V a, V b) { return m ? a : b; }
};

template <>
struct ScalarOps<double> {
  using V = double;
  using M = bool;
  static GK_HD V splat(double x) { return x; }
  static GK_HD V exp(V x) { return ::exp(x); }
  static GK_HD V exp_neg_bounded(V x) { return ::exp(-x); }
  static GK_HD V exp_neg_small(V x) { return ::exp(-x); }
  static GK_HD V recip(V x) { return V(1) / x; }
  static GK_HD V fma(V a, V b, V c) { return ::fma(a, b, c); }
  // NaN-dropping min/max: callers that use them add gol_math.h's poison term.
  static GK_HD V min(V a, V b) { return fmin(a, b); }
  static GK_HD V max(V a, V b) { return fmax(a, b); }
  static GK_HD V one_minus_exp_neg(V t, V /*p*/) { return -::expm1(-t); }
  static GK_HD V log(V x) { return ::log(x); }
  static GK_HD V log1p(V x) { return ::log1p(x); }
  static GK_HD V neg(V x) { return -x; }
  static GK_HD V abs(V x) { return fabs(x); }
  static GK_HD M lt(V a, V b) { return a < b; }
  static GK_HD M gt(V a, V b) { return a > b; }
  static GK_HD M both(M a, M b) { return a && b; }
  static GK_HD V select(M m, V a, V b) { return m ? a : b; }
};

// ---------------------------------------------------------------------------------------------
// Per-element loss and gradient (unweighted). `y` is known per call site (the kernels split a
// row into its negatives and its single positive), so no select on y is needed in the hot loop.
template <class O>
struct ElementMath {
  using V = typename O::V;
  using M = typename O::M;

  // max/min that keep a NaN operand (std::fmax would replace it), so NaN logits stay visible.
  static GK_HD V max_keep_nan(V x, V bound) { return O::select(O::lt(x, bound), bound, x); }
  static GK_HD V min_keep_nan(V x, V bound) { return O::select(O::gt(x, bound), bound, x); }

  // 0 for finite q, NaN for +-Inf and NaN: added to loss and gradient so that a non-finite
  // logit is never hidden by the clamp (SPEC.md section 6).
  static GK_HD V poison(V q) { return q - q; }

  struct Gumbel {
    V q, t, one_minus_p, p;
    M inside;  // lo < q < hi: the clamp passes the gradient
  };

  static GK_HD Gumbel gumbel(V q, V lo, V hi) {
    Gumbel g;
    g.q = q;
    const V qc = min_keep_nan(max_keep_nan(q, lo), hi);
    g.t = O::exp(O::neg(qc));
    g.p = O::exp(O::neg(g.t));
    g.one_minus_p = O::one_minus_exp_neg(g.t, g.p);  // 1 - p without cancellation near p = 1
    g.inside = O::both(O::gt(q, lo), O::lt(q, hi));
    return g;
  }

  // BCE's backward divides by max(p (1 - p), eps); below eps (p < 1e-12, i.e. q < -3.32) it
  // multiplies by 1 / eps instead. Above, the p (1 - p) factors cancel, which leaves one
  // division per element for both grad modes.
  static GK_HD M bce_eps_active(const Gumbel& g) {
    return O::lt(g.p * g.one_minus_p, O::splat(kBceEps));
  }

  // p t, which is 0 * inf = NaN once t = exp(-q) overflows (q < -88.7 without a clamp); the
  // limit there is 0, which p * min(t, max) gives. A NaN t (NaN q) stays NaN.
  static GK_HD V p_times_t(const Gumbel& g) {
    return g.p * min_keep_nan(g.t, O::splat(kLargestFinite));
  }

  // y = 0: loss -log(1 - p); gradient p t / (1 - p), or BCE's p^2 t / max(p (1 - p), eps).
  // The closed form (the float64 instantiations): once p <= 1/2, -log1p(-p), since 1 - p rounds
  // to 1 for t > 36 and -log(1 - p) would give 0 for a loss of ~p.
  static GK_HD void gumbel_negative(const Gumbel& g, GradMode grad_mode, V* loss, V* grad) {
    const V zero = O::splat(0.0f);
    const V poisoned = poison(g.q);
    const V neg_log = O::select(O::lt(g.p, O::splat(0.5f)), O::neg(O::log1p(O::neg(g.p))),
                                O::neg(O::log(g.one_minus_p)));
    *loss = min_keep_nan(neg_log, O::splat(kLossCap)) + poisoned;
    const V pt = p_times_t(g);
    V d = pt / g.one_minus_p;
    if (grad_mode == GradMode::kReference) {
      // (p / eps) (p t), not p^2 t / eps: p^2 is a denormal for q near the lower clamp.
      d = O::select(bce_eps_active(g), (g.p * O::splat(1.0f / kBceEps)) * pt, d);
    }
    *grad = O::select(g.inside, d, zero) + poisoned;
  }

  static GK_HD V horner(V x, V c0, V c1, V c2, V c3) {
    return O::fma(O::fma(O::fma(c0, x, c1), x, c2), x, c3);
  }

  // A negative element while t = exp(-qc) is small (t < 1), with u = t / 2:
  //   -log(1 - e^-t) = qc + u - log(sinh(u) / u), the last a series in u^2, and
  //   p t / (1 - p) = t / (e^t - 1), the Bernoulli series in t^2.
  static GK_HD void small_t_series(V qc, V t, V* loss, V* grad) {
    const V u = t * O::splat(0.5f);
    const V u2 = u * u;
    const V log_sinhc = horner(u2, O::splat(-1.0f / 37800.0f), O::splat(1.0f / 2835.0f),
                               O::splat(-1.0f / 180.0f), O::splat(1.0f / 6.0f)) * u2;
    *loss = qc + u - log_sinhc;
    const V t2 = t * t;
    *grad = O::fma(horner(t2, O::splat(-1.0f / 1209600.0f), O::splat(1.0f / 30240.0f),
                          O::splat(-1.0f / 720.0f), O::splat(1.0f / 12.0f)),
                   t2, O::splat(1.0f) - u);
  }

  // The same negative element in float32 with one exp less, no log and one division: the
  // float kernels' path for clamps outside the bounded range. With t = exp(-qc):
  //  t < 0.7:  small_t_series;
  //  t >= 0.7: p = e^-t <= 1/2 and -log(1 - p) = 2 atanh(s), s = p / (2 - p) <= 1/3, a series.
  // Both are within 1.5e-7 relative of the closed forms (tests/test_gol_loss.py holds them to
  // the float64 reference), and both branches are computed so that vector lanes may differ.
  static GK_HD void gumbel_negative_series(V q, V lo, V hi, GradMode grad_mode, V* loss,
                                           V* grad) {
    const V one = O::splat(1.0f);
    const V poisoned = poison(q);
    const V qc = min_keep_nan(max_keep_nan(q, lo), hi);
    const V t = O::exp(O::neg(qc));
    V loss_low, grad_low;
    small_t_series(qc, t, &loss_low, &grad_low);

    const V p = O::exp(O::neg(t));
    const V a = one - p;                // >= 1/2 here, no cancellation
    const V b = O::splat(2.0f) - p;
    const V r = one / (a * b);
    const V s = p * a * r;              // p / (2 - p)
    // s ~ p / 2 is ~1e-24 near q = -4, where s^2 would be a (slow) denormal; the terms of s^2
    // are below float resolution there anyway.
    const V s_floor = max_keep_nan(s, O::splat(1e-12f));
    const V s2 = s_floor * s_floor;
    const V atanh_ratio =
        horner(s2, horner(s2, O::splat(1.0f / 13.0f), O::splat(1.0f / 11.0f),
                          O::splat(1.0f / 9.0f), O::splat(1.0f / 7.0f)),
               O::splat(1.0f / 5.0f), O::splat(1.0f / 3.0f), one);
    const V loss_high = O::splat(2.0f) * s * atanh_ratio;
    // p t / (1 - p); t capped so that p t is 0, its limit, rather than 0 * inf once t overflows
    // (q < -88.7 without a clamp).
    const V pt = p * min_keep_nan(t, O::splat(kLargestFinite));
    V grad_high = pt * b * r;

    const M low = O::lt(t, O::splat(0.7f));
    V d = O::select(low, grad_low, grad_high);
    if (grad_mode == GradMode::kReference) {
      // BCE's eps: p (1 - p) < 1e-12 when p is tiny (q < -3.32) or when 1 - p ~ t is (q > 27.6).
      const V inv_eps = O::splat(1.0f / kBceEps);
      d = O::select(O::lt(p, O::splat(kBceEps)), (p * inv_eps) * pt, d);
      d = O::select(O::lt(t, O::splat(kBceEps)), t * inv_eps, d);
    }
    *loss = min_keep_nan(O::select(low, loss_low, loss_high), O::splat(kLossCap)) + poisoned;
    const M inside = O::both(O::gt(q, lo), O::lt(q, hi));
    *grad = O::select(inside, d, O::splat(0.0f)) + poisoned;
  }

  // The float32 hot path for clamps inside [kBoundedClampMin, kBoundedClampMax] (the GOL
  // default (-4, 10) is): t = exp(-qc) lies in [1.9e-12, 54.6], so no exp over- or underflows,
  // no intermediate is a denormal (the CPU computes those through slow microcode assists), the
  // loss stays below the cap and BCE's eps can only bite through p < 1e-12. Unpoisoned: callers
  // add poison(q) themselves (the CPU kernel once per row chunk, for kept and dropped lanes).
  //   t < 1:  small_t_series;
  //   t >= 1: p = e^-t <= 1/e and -log(1 - p) = p Q(p), Q a polynomial fit of -log(1 - p) / p
  //           on [0, 1/e] (weighted least squares on Chebyshev nodes, within 1e-7 relative in
  //           float32); the gradient p t / (1 - p) with one reciprocal.
  static GK_HD void gumbel_negative_bounded_core(V q, V lo, V hi, GradMode grad_mode, V* loss,
                                                 V* grad) {
    const V one = O::splat(1.0f);
    const V qc = O::min(O::max(q, lo), hi);
    const V t = O::exp_neg_small(qc);
    V loss_low, grad_low;
    small_t_series(qc, t, &loss_low, &grad_low);

    const V p = O::exp_neg_bounded(t);
    const V q_poly = horner(p, horner(p, O::splat(0.574717104f), O::splat(-0.203410551f),
                                      O::splat(0.288397342f), O::splat(0.177490458f)),
                            O::splat(0.252199203f), O::splat(0.333229631f), O::splat(0.500001848f));
    const V loss_high = p * O::fma(q_poly, p, one);
    V factor = O::recip(one - p);  // 1 / (1 - p), 1 - p >= 0.63
    if (grad_mode == GradMode::kReference) {
      // BCE's p^2 t / eps where p (1 - p) < eps, i.e. p < eps here; (p / eps) (p t) stays normal.
      factor = O::select(O::lt(p, O::splat(kBceEps)), p * O::splat(1.0f / kBceEps), factor);
    }
    const V grad_high = (p * t) * factor;

    const M low = O::lt(t, one);
    *loss = O::select(low, loss_low, loss_high);
    const M inside = O::both(O::gt(q, lo), O::lt(q, hi));
    *grad = O::select(inside, O::select(low, grad_low, grad_high), O::splat(0.0f));
  }

  static GK_HD void gumbel_negative_bounded(V q, V lo, V hi, GradMode grad_mode, V* loss,
                                            V* grad) {
    gumbel_negative_bounded_core(q, lo, hi, grad_mode, loss, grad);
    *loss = *loss + poison(q);
    *grad = *grad + poison(q);
  }

  // y = 1: loss t; gradient -t, or BCE's -(1 - p) p t / max(p (1 - p), eps) (its dead zone).
  static GK_HD void gumbel_positive(const Gumbel& g, GradMode grad_mode, V* loss, V* grad) {
    const V zero = O::splat(0.0f);
    const V poisoned = poison(g.q);
    *loss = min_keep_nan(g.t, O::splat(kLossCap)) + poisoned;
    V d = O::neg(g.t);
    if (grad_mode == GradMode::kReference) {
      const V dead_zone = O::neg(p_times_t(g)) * g.one_minus_p * O::splat(1.0f / kBceEps);
      d = O::select(bce_eps_active(g), dead_zone, d);
    }
    *grad = O::select(g.inside, d, zero) + poisoned;
  }

  // Sigmoid BCE (the paper's baseline): softplus(q) - y q, gradient sigmoid(q) - y.
  static GK_HD void sigmoid(V q, bool positive, V* loss, V* grad) {
    const V zero = O::splat(0.0f);
    const V one = O::splat(1.0f);
    const V e = O::exp(O::neg(O::abs(q)));
    const V softplus = max_keep_nan(q, zero) + O::log1p(e);
    // sigmoid from e = exp(-|q|) so that neither branch overflows.
    const V s = O::select(O::lt(q, zero), e / (one + e), one / (one + e));
    *loss = (positive ? softplus - q : softplus) + poison(q);
    *grad = (positive ? s - one : s) + poison(q);
  }
};

// ---------------------------------------------------------------------------------------------
// Everything a kernel needs besides the tensors.
struct GolParams {
  int64_t num_rows = 0;
  int64_t num_classes = 0;
  Mode mode = Mode::kDropLoss;
  Activation activation = Activation::kGumbel;
  Reduction reduction = Reduction::kMean;
  GradMode grad_mode = GradMode::kReference;
  float clamp_min = -4.0f;  // -inf when unbounded
  float clamp_max = 10.0f;  // +inf when unbounded
  int64_t ignore_index = -100;
  PhiloxKey philox{0, 0, 0, 0};
  bool need_grad = true;
};

}  // namespace gk
