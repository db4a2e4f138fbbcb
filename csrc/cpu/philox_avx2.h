// Eight Philox4x32-10 calls at once with AVX2 (lane k serves group g0 + k), bit-identical to
// gk::philox4x32_10 in gol_math.h. The DropLoss background rows need one call per four
// elements; done one call at a time the stream would cost more than the loss itself.
#pragma once

#include <cstdint>

#include "../gol_math.h"

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>

namespace gk {
namespace cpu {

// (hi, lo) 32-bit halves of a * m in each 32-bit lane.
inline void mulhilo8(__m256i a, __m256i m, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(a, m);  // lanes 0, 2, 4, 6 as 64-bit products
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), _mm256_srli_epi64(m, 32));
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  *lo = _mm256_mullo_epi32(a, m);
}

// words[w] holds output word w of the calls for groups g0 .. g0 + 7.
inline void philox_groups8(int64_t g0, const PhiloxKey& key, __m256i words[4]) {
  const uint64_t base = static_cast<uint64_t>(g0);
  const __m256i lane = _mm256_setr_epi64x(0, 1, 2, 3);
  // 64-bit group indices, then their low and high words in 32-bit lane order.
  const __m256i g_lo4 = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<int64_t>(base)), lane);
  const __m256i g_hi4 = _mm256_add_epi64(g_lo4, _mm256_set1_epi64x(4));
  const __m256i pick_lo = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
  const __m256i pick_hi = _mm256_setr_epi32(1, 3, 5, 7, 1, 3, 5, 7);
  __m256i c0 = _mm256_permute2x128_si256(_mm256_permutevar8x32_epi32(g_lo4, pick_lo),
                                         _mm256_permutevar8x32_epi32(g_hi4, pick_lo), 0x20);
  __m256i c1 = _mm256_permute2x128_si256(_mm256_permutevar8x32_epi32(g_lo4, pick_hi),
                                         _mm256_permutevar8x32_epi32(g_hi4, pick_hi), 0x20);
  __m256i c2 = _mm256_set1_epi32(static_cast<int32_t>(key.offset0));
  __m256i c3 = _mm256_set1_epi32(static_cast<int32_t>(key.offset1));
  const __m256i m0 = _mm256_set1_epi32(static_cast<int32_t>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int32_t>(0xCD9E8D57u));
  uint32_t k0 = key.key0, k1 = key.key1;
  for (int round = 0; round < 10; ++round) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo8(c0, m0, &hi0, &lo0);
    mulhilo8(c2, m1, &hi1, &lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int32_t>(k0)));
    c1 = lo1;
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int32_t>(k1)));
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  words[0] = c0;
  words[1] = c1;
  words[2] = c2;
  words[3] = c3;
}

// Bit k of result[w] is set when word w of group g0 + k gives a uniform above `ratio`.
inline void drop_bits_groups8(int64_t g0, const PhiloxKey& key, float ratio, int result[4]) {
  __m256i words[4];
  philox_groups8(g0, key, words);
  const __m256 scale = _mm256_set1_ps(5.9604644775390625e-08f);
  const __m256 threshold = _mm256_set1_ps(ratio);
  for (int w = 0; w < 4; ++w) {
    const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(words[w], 8)), scale);
    result[w] = _mm256_movemask_ps(_mm256_cmp_ps(u, threshold, _CMP_GT_OQ));
  }
}

}  // namespace cpu
}  // namespace gk
#endif
