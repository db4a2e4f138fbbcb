// Sixteen Philox4x32-10 calls at once with AVX2, bit-identical to gk::philox4x32_10 in
// gol_math.h: the DropLoss background rows need one call per four elements, and one call at a
// time the stream would cost more than the loss itself. Two independent batches of eight calls
// go through the rounds together, so that one batch's multiplies overlap the other's latency.
#pragma once

#include <cmath>
#include <cstdint>

#include "../gol_math.h"

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>

namespace gk {
namespace cpu {

// The key schedule and the drop threshold of one call, as vectors.
struct PhiloxDropConstants {
  __m256i key0[10], key1[10];
  __m256i offset0, offset1;
  // u > ratio  <=>  (x >> 8) > floor(ratio * 2^24), u = (x >> 8) 2^-24 (SPEC.md section 4).
  __m256i threshold;

  PhiloxDropConstants(const PhiloxKey& key, float ratio) {
    uint32_t k0 = key.key0, k1 = key.key1;
    for (int round = 0; round < 10; ++round) {
      key0[round] = _mm256_set1_epi32(static_cast<int32_t>(k0));
      key1[round] = _mm256_set1_epi32(static_cast<int32_t>(k1));
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    offset0 = _mm256_set1_epi32(static_cast<int32_t>(key.offset0));
    offset1 = _mm256_set1_epi32(static_cast<int32_t>(key.offset1));
    threshold = _mm256_set1_epi32(static_cast<int32_t>(std::floor(double(ratio) * 16777216.0)));
  }
};

// (hi, lo) 32-bit halves of a * m in each 32-bit lane (m: the same constant in every lane).
inline void mulhilo8(__m256i a, __m256i m, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(a, m);  // lanes 0, 2, 4, 6 as 64-bit products
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  *lo = _mm256_mullo_epi32(a, m);
}

// Bit 4k + w of the result is set when output word w of the call for group g0 + k (k < 16)
// gives a uniform above the ratio: element order, since element e uses word e & 3 of group e >> 2.
inline uint64_t drop_bits_groups16(int64_t g0, const PhiloxDropConstants& constants) {
  constexpr int kBatches = 2;
  const uint64_t base = static_cast<uint64_t>(g0);
  const __m256i base_lo = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(base)));
  const __m256i base_hi = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(base >> 32)));
  const __m256i sign = _mm256_set1_epi32(INT32_MIN);
  __m256i c0[kBatches], c1[kBatches], c2[kBatches], c3[kBatches];
  for (int b = 0; b < kBatches; ++b) {
    // 64-bit group index base + 8b + k as (lo, hi) words; lo wrapping around carries into hi.
    const __m256i lane = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                          _mm256_set1_epi32(8 * b));
    c0[b] = _mm256_add_epi32(base_lo, lane);
    const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(base_lo, sign),
                                               _mm256_xor_si256(c0[b], sign));  // -1 on carry
    c1[b] = _mm256_sub_epi32(base_hi, wrapped);
    c2[b] = constants.offset0;
    c3[b] = constants.offset1;
  }
  const __m256i m0 = _mm256_set1_epi32(static_cast<int32_t>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int32_t>(0xCD9E8D57u));
  for (int round = 0; round < 10; ++round) {
    for (int b = 0; b < kBatches; ++b) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(c0[b], m0, &hi0, &lo0);
      mulhilo8(c2[b], m1, &hi1, &lo1);
      c0[b] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[b]), constants.key0[round]);
      c1[b] = lo1;
      c2[b] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[b]), constants.key1[round]);
      c3[b] = lo0;
    }
  }
  // Compare masks -> bytes in (group, word) order within each 128-bit half -> one bit each.
  const __m256i word_major_to_group_major = _mm256_setr_epi8(
      0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
      0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  uint64_t bits = 0;
  for (int b = 0; b < kBatches; ++b) {
    const __m256i a0 = _mm256_cmpgt_epi32(_mm256_srli_epi32(c0[b], 8), constants.threshold);
    const __m256i a1 = _mm256_cmpgt_epi32(_mm256_srli_epi32(c1[b], 8), constants.threshold);
    const __m256i a2 = _mm256_cmpgt_epi32(_mm256_srli_epi32(c2[b], 8), constants.threshold);
    const __m256i a3 = _mm256_cmpgt_epi32(_mm256_srli_epi32(c3[b], 8), constants.threshold);
    // Per 128-bit half (groups k..k+3): bytes w0[0..3] w1[0..3] w2[0..3] w3[0..3].
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(a0, a1), _mm256_packs_epi32(a2, a3));
    const __m256i ordered = _mm256_shuffle_epi8(bytes, word_major_to_group_major);
    bits |= static_cast<uint64_t>(static_cast<uint32_t>(_mm256_movemask_epi8(ordered))) << (32 * b);
  }
  return bits;
}

}  // namespace cpu
}  // namespace gk
#endif
