// grouped.h's tile for AVX2 with FMA: 6 pixels x 16 output channels, two
// ymm accumulators per pixel. The two 8-channel halves of a column block
// read one group's input channels (cg a multiple of 16: one broadcast feeds
// both), two groups' (cg 8: a broadcast each), or four (cg 4: each pixel's
// 8 input channels loaded once per tap, and lane l takes channel i of its
// own group with an in-lane shuffle).
#include "grouped.h"

#if RF_GEMM_X86
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace resnet_fused {
namespace cpu {
namespace grouped {
namespace {

// acc[i][h] += x (8 lanes from each pixel) * w for the products of input channel i
template <int G>
__attribute__((always_inline)) inline void taps_of_block(const Conv& c, const float* const* taps, int64_t cb,
                                                         __m256 (&acc)[kRows][2]) {
  const int64_t cg = c.cg, c0 = cb * kBlock;
  const float* w = c.w + cb * kTaps * cg * kBlock;
  if constexpr (G == 4) {  // four groups of 4: lane l of a half takes channel i of group l / 4
    // one half at a time (6 accumulators, the half's 4 weight vectors, a
    // pixel's 8 channels and their shuffle: 12 registers of 16; both halves
    // at once spilled)
    for (int h = 0; h < 2; ++h)
      for (int t = 0; t < kTaps; ++t) {
        const float* const* a = taps + t * kRows;
        const float* wt = w + t * 4 * kBlock + 8 * h;
        const __m256 w0 = _mm256_loadu_ps(wt), w1 = _mm256_loadu_ps(wt + kBlock), w2 = _mm256_loadu_ps(wt + 2 * kBlock),
                     w3 = _mm256_loadu_ps(wt + 3 * kBlock);
        for (int r = 0; r < kRows; ++r) {
          const __m256 x = _mm256_loadu_ps(a[r] + c0 + 8 * h);
          acc[r][h] = _mm256_fmadd_ps(_mm256_permute_ps(x, 0x00), w0, acc[r][h]);
          acc[r][h] = _mm256_fmadd_ps(_mm256_permute_ps(x, 0x55), w1, acc[r][h]);
          acc[r][h] = _mm256_fmadd_ps(_mm256_permute_ps(x, 0xAA), w2, acc[r][h]);
          acc[r][h] = _mm256_fmadd_ps(_mm256_permute_ps(x, 0xFF), w3, acc[r][h]);
        }
      }
    return;
  }
  for (int t = 0; t < kTaps; ++t) {
    const float* const* a = taps + t * kRows;
    if constexpr (G == 16) {  // one group: its cg channels
      const int64_t in0 = c0 / cg * cg;
      for (int64_t i = 0; i < cg; ++i, w += kBlock) {
        const __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
        for (int r = 0; r < kRows; ++r) {
          const __m256 x = _mm256_set1_ps(a[r][in0 + i]);
          acc[r][0] = _mm256_fmadd_ps(x, w0, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(x, w1, acc[r][1]);
        }
      }
    } else if constexpr (G == 8) {  // two groups of 8: channels c0 + i and c0 + 8 + i
      for (int64_t i = 0; i < 8; ++i, w += kBlock) {
        const __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
        for (int r = 0; r < kRows; ++r) {
          acc[r][0] = _mm256_fmadd_ps(_mm256_set1_ps(a[r][c0 + i]), w0, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(_mm256_set1_ps(a[r][c0 + 8 + i]), w1, acc[r][1]);
        }
      }
    }
  }
}

template <int G>
void tile(const Conv& c, const float* const* taps, int64_t rows, int64_t m, int64_t cb) {
  __m256 acc[kRows][2];
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  taps_of_block<G>(c, taps, cb, acc);
  const int64_t c0 = cb * kBlock;
  for (int h = 0; h < 2; ++h) {
    const __m256 bias = c.bias ? _mm256_loadu_ps(c.bias + c0 + 8 * h) : _mm256_setzero_ps();
    for (int64_t r = 0; r < rows; ++r) {
      __m256 v = acc[r][h];
      if (c.bias) v = _mm256_add_ps(v, bias);
      if (c.residual) v = _mm256_add_ps(v, _mm256_loadu_ps(c.residual + (m + r) * c.C + c0 + 8 * h));
      // vmaxps returns its second operand unless the first is greater: NaN stays NaN
      if (c.relu) v = _mm256_max_ps(_mm256_setzero_ps(), v);
      _mm256_storeu_ps(c.y + (m + r) * c.C + c0 + 8 * h, v);
    }
  }
}

}  // namespace

void tile_avx2(const Conv& c, const float* const* taps, int64_t rows, int64_t m, int64_t cb) {
  if (c.cg == 4)
    tile<4>(c, taps, rows, m, cb);
  else if (c.cg == 8)
    tile<8>(c, taps, rows, m, cb);
  else
    tile<16>(c, taps, rows, m, cb);
}

}  // namespace grouped
}  // namespace cpu
}  // namespace resnet_fused
#pragma GCC pop_options
#endif
