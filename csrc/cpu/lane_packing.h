// Packing the kept lanes of 8-float chunks into a dense buffer, and expanding results back.
//
// Most elements of a DropLoss row have weight 0 (the negatives of the drop classes, about two
// thirds of LVIS, on foreground rows and on most background rows), so their loss and gradient
// are exactly 0. The CPU kernel packs the kept logits of a row densely, runs the element math on
// those only, and expands the results back into the row, zeros elsewhere. Both moves are one
// lane permutation per chunk, looked up from the chunk's 8-bit keep mask.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cstdint>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace gk {
namespace cpu {

// For each 8-bit mask, eight 4-bit lane indices packed in a uint32 (lane k in bits 4k..4k+3).
// pack: lane r of the packed chunk reads source lane (r-th set bit of the mask).
// expand: lane k (bit k set) reads packed lane (number of set bits below k); other lanes 0.
struct LanePermutations {
  uint32_t pack[256];
  uint32_t expand[256];
};

constexpr LanePermutations make_lane_permutations() {
  LanePermutations table{};
  for (uint32_t mask = 0; mask < 256; ++mask) {
    uint32_t pack = 0, expand = 0, rank = 0;
    for (uint32_t lane = 0; lane < 8; ++lane) {
      if ((mask >> lane) & 1) {
        pack |= lane << (4 * rank);
        expand |= rank << (4 * lane);
        ++rank;
      }
    }
    table.pack[mask] = pack;
    table.expand[mask] = expand;
  }
  return table;
}

inline constexpr LanePermutations kLanePermutations = make_lane_permutations();

// Lanes per chunk: 8 with AVX2; other at::vec builds may have fewer (4 on aarch64), never more.
constexpr int kPackWidth = at::vec::Vectorized<float>::size();
static_assert(kPackWidth <= 8, "lane masks are 8-bit: a chunk holds at most 8 lanes");
constexpr uint32_t kChunkLanes = (1u << kPackWidth) - 1;

inline int popcount8(uint32_t mask) { return __builtin_popcount(mask & kChunkLanes); }

#if defined(CPU_CAPABILITY_AVX2)
static_assert(kPackWidth == 8, "the AVX2 permutations move 8 lanes");

inline __m256i lane_indices(uint32_t nibbles) {
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int32_t>(nibbles)), shifts),
                          _mm256_set1_epi32(15));
}
#endif

// Stores the lanes of `v` whose mask bit is set at dst[0 ..), in lane order, and returns how
// many. May write all kPackWidth floats at dst: the caller's buffer has 8 floats to spare.
inline int pack_lanes(const at::vec::Vectorized<float>& v, uint32_t mask, float* dst) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256 packed =
      _mm256_permutevar8x32_ps(v, lane_indices(kLanePermutations.pack[mask & 0xFF]));
  _mm256_storeu_ps(dst, packed);
#else
  float lanes[kPackWidth];
  v.store(lanes);
  int r = 0;
  for (int k = 0; k < kPackWidth; ++k) {
    if ((mask >> k) & 1) dst[r++] = lanes[k];
  }
#endif
  return popcount8(mask);
}

// The inverse of pack_lanes: lane k is src[rank of k] where bit k is set, else 0. May read
// kPackWidth floats at src.
inline at::vec::Vectorized<float> expand_lanes(const float* src, uint32_t mask) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256 spread = _mm256_permutevar8x32_ps(
      _mm256_loadu_ps(src), lane_indices(kLanePermutations.expand[mask & 0xFF]));
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i kept = _mm256_cmpeq_epi32(
      _mm256_and_si256(_mm256_set1_epi32(static_cast<int32_t>(mask)), lane_bit), lane_bit);
  return _mm256_and_ps(_mm256_castsi256_ps(kept), spread);
#else
  float lanes[kPackWidth];
  int r = 0;
  for (int k = 0; k < kPackWidth; ++k) lanes[k] = ((mask >> k) & 1) ? src[r++] : 0.0f;
  return at::vec::Vectorized<float>::loadu(lanes);
#endif
}

}  // namespace cpu
}  // namespace gk
