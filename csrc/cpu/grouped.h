// The tiles of the CPU grouped 3x3 convolution (grouped_conv.cpp), written
// once for AVX2 with FMA (grouped_avx2.cpp, also what AVX-512 CPUs run) and
// once in scalar C++ (the reference, and CPUs without AVX2):
//   y[m, o] = act(sum over taps t = (r, s), then i < cg, of
//                 x[tap t of pixel m, (o / cg) * cg + i] * w[o, i, r, s]
//                 + bias[o] + residual[m, o])
// Each output is one fused multiply-add chain in that order (t, then i) in
// both, so they give the same bits; every product of a real input is
// formed (no zero weights stand in for the other groups), so NaN and
// infinity reach exactly the outputs of their own group, as in a direct
// convolution. Padded taps read a row of zeros.
#pragma once

#include <cstdint>

#include "gemm.h"  // RF_GEMM_X86

namespace resnet_fused {
namespace cpu {
namespace grouped {

constexpr int64_t kBlock = 16;  // output channels per column block
constexpr int64_t kRows = 6;    // output pixels per tile
constexpr int kTaps = 9;

struct Conv {
  const float* w;         // packed: (C / kBlock, 9, cg, kBlock), w[o, i, r, s] at [o / 16][3r + s][i][o % 16]
  const float* bias;      // C values, or null
  const float* residual;  // row m at residual + m * C, or null
  float* y;               // row m at y + m * C
  int64_t C, cg;
  bool relu;
};

// Output rows [m, m + rows) (rows <= kRows) of column block cb; taps[t *
// kRows + i] is tile row i's input pixel (its channel 0) for tap t, or a
// row of C zeros (padding, and the rows past `rows`). cg is 4, 8 or a
// multiple of 16.
using TileFn = void (*)(const Conv&, const float* const* taps, int64_t rows, int64_t m, int64_t cb);
void tile_avx2(const Conv&, const float* const*, int64_t, int64_t, int64_t);
void tile_generic(const Conv&, const float* const*, int64_t, int64_t, int64_t);

}  // namespace grouped
}  // namespace cpu
}  // namespace resnet_fused
