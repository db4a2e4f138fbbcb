// Fast float32 exp and log for at::vec::Vectorized<float> on AVX2.
//
// at::vec's exp/log call Sleef's 1-ulp routines, which cost about as much as the rest of the
// GOL element math together; these Cephes-style polynomials (Cody-Waite range reduction, a
// degree-6 polynomial for exp, frexp plus a degree-8 polynomial for log) are within ~2 ulp,
// far inside the kernels' tolerance against the reference, and keep the IEEE special values
// (NaN, +-Inf, 0, denormals) so that non-finite logits still surface. Without AVX2 they fall
// back to at::vec's own routines.
#pragma once

#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace gk {
namespace cpu {

using VecF = at::vec::Vectorized<float>;

#if defined(CPU_CAPABILITY_AVX2)

inline __m256 scale_by_pow2(__m256 y, __m256i n) {
  // y * 2^n for n in [-151, 128], in two steps so that denormal results keep their bits.
  const __m256i half = _mm256_srai_epi32(n, 1);
  const __m256i rest = _mm256_sub_epi32(n, half);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(rest, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(y, s1), s2);
}

// exp for inputs already in [-104, 88.7] (or NaN, which yields an unspecified finite value:
// the callers add a NaN "poison" term of their own).
inline __m256 exp_core(__m256 x) {
  // n = round(x / ln 2); r = x - n ln 2 with ln 2 split in two for an exact first product.
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  return scale_by_pow2(y, _mm256_cvtps_epi32(n));
}

constexpr float kExpHigh = 88.72283935546875f;   // exp overflows to +inf above
constexpr float kExpLow = -103.97283935546875f;  // and underflows to 0 below

// exp with only the input range clamped: for the element math, whose NaN/Inf logits are
// surfaced separately (gol_math.h's poison term).
inline VecF fast_exp_lean(const VecF& value) {
  return exp_core(_mm256_min_ps(_mm256_max_ps(value, _mm256_set1_ps(kExpLow)),
                                _mm256_set1_ps(kExpHigh)));
}

// exp for x in [-87, 88] only (no range checks; NaN gives an unspecified value): the bounded
// Gumbel path, whose arguments are -qc in [-27, 4] and -t in [-54.6, 0]. n = round(x / ln 2)
// comes from one fma with a magic constant whose low mantissa bits then hold n + 127, already
// the exponent field of 2^n; a degree-4 fit of (e^r - 1 - r) / r^2 on [-ln 2 / 2, ln 2 / 2]
// (least squares on Chebyshev nodes) keeps the result within 1.1e-7 relative.
inline VecF fast_exp_bounded(const VecF& value) {
  const __m256 x = value;
  const __m256 magic = _mm256_set1_ps(12582912.0f + 127.0f);  // 1.5 * 2^23 + exponent bias
  const __m256 k = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), magic);
  const __m256 n = _mm256_sub_ps(k, magic);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.39336463e-3f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.36317521e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.16664667e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.66665763e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(0.5f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(k), 23));
  return _mm256_mul_ps(y, two_n);
}

inline VecF min_drop_nan(const VecF& a, const VecF& b) { return _mm256_min_ps(a, b); }
inline VecF max_drop_nan(const VecF& a, const VecF& b) { return _mm256_max_ps(a, b); }

inline VecF fast_exp(const VecF& value) {
  const __m256 x_in = value;
  const __m256 hi_limit = _mm256_set1_ps(kExpHigh);
  const __m256 lo_limit = _mm256_set1_ps(kExpLow);
  __m256 result = exp_core(_mm256_min_ps(_mm256_max_ps(x_in, lo_limit), hi_limit));
  result = _mm256_blendv_ps(result, _mm256_set1_ps(INFINITY),
                            _mm256_cmp_ps(x_in, hi_limit, _CMP_GT_OQ));
  result = _mm256_blendv_ps(result, _mm256_setzero_ps(), _mm256_cmp_ps(x_in, lo_limit, _CMP_LT_OQ));
  // NaN in, NaN out (the min/max above would have replaced it).
  return _mm256_blendv_ps(result, x_in, _mm256_cmp_ps(x_in, x_in, _CMP_UNORD_Q));
}

// log for positive normal inputs (no zero, denormal, Inf or NaN handling).
inline __m256 log_core(__m256 x, __m256 e_adjust) {
  const __m256 one = _mm256_set1_ps(1.0f);
  // frexp: x = m * 2^e with m in [0.5, 1).
  const __m256i bits = _mm256_castps_si256(x);
  __m256 e = _mm256_cvtepi32_ps(
      _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
  e = _mm256_add_ps(e, e_adjust);
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(
      _mm256_and_si256(bits, _mm256_set1_epi32(0x007FFFFF)), _mm256_set1_epi32(0x3F000000)));
  // m in [sqrt(1/2), sqrt(2)) around 1: log(m) = log1p(m - 1) by the polynomial.
  const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm256_sub_ps(e, _mm256_and_ps(small, one));
  m = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(small, m)), one);
  const __m256 z = _mm256_mul_ps(m, m);
  __m256 y = _mm256_set1_ps(7.0376836292e-2f);
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.1514610310e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.1676998740e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.2420140846e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.4249322787e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.6668057665e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(2.0000714765e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-2.4999993993e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(3.3333331174e-1f));
  y = _mm256_mul_ps(_mm256_mul_ps(y, m), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z, y);
  const __m256 result = _mm256_add_ps(m, y);
  return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), result);
}

inline VecF fast_log_lean(const VecF& value) { return log_core(value, _mm256_setzero_ps()); }

inline VecF fast_log(const VecF& value) {
  const __m256 x_in = value;
  // Denormals: scale into the normal range first (their exponent field reads as 0).
  const __m256 tiny = _mm256_cmp_ps(x_in, _mm256_set1_ps(1.17549435e-38f), _CMP_LT_OQ);
  const __m256 x = _mm256_blendv_ps(x_in, _mm256_mul_ps(x_in, _mm256_set1_ps(8388608.0f)), tiny);
  __m256 result = log_core(x, _mm256_and_ps(tiny, _mm256_set1_ps(-23.0f)));
  // Special values: log(0) = -inf, log(+inf) = +inf, log(<0) = NaN, NaN stays NaN.
  result = _mm256_blendv_ps(result, _mm256_set1_ps(-INFINITY),
                            _mm256_cmp_ps(x_in, _mm256_setzero_ps(), _CMP_EQ_OQ));
  result = _mm256_blendv_ps(result, _mm256_set1_ps(INFINITY),
                            _mm256_cmp_ps(x_in, _mm256_set1_ps(INFINITY), _CMP_EQ_OQ));
  return _mm256_blendv_ps(result, _mm256_set1_ps(NAN),
                          _mm256_cmp_ps(x_in, _mm256_setzero_ps(), _CMP_NGE_UQ));
}

#else

inline VecF fast_exp(const VecF& x) { return x.exp(); }
inline VecF fast_exp_bounded(const VecF& x) { return x.exp(); }
// at::vec's minimum/maximum propagate NaN; the callers add their own poison term either way.
inline VecF min_drop_nan(const VecF& a, const VecF& b) { return at::vec::minimum(a, b); }
inline VecF max_drop_nan(const VecF& a, const VecF& b) { return at::vec::maximum(a, b); }
inline VecF fast_exp_lean(const VecF& x) { return x.exp(); }
inline VecF fast_log(const VecF& x) { return x.log(); }
inline VecF fast_log_lean(const VecF& x) { return x.log(); }

#endif

}  // namespace cpu
}  // namespace gk
