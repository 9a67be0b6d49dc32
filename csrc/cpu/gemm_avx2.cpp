// gemm_kernel.h for AVX2 with FMA: 6 rows x 16 columns per tile (12 ymm
// accumulators, 2 for B, 1 broadcast).
#include <utility>

#include "gemm.h"

#if RF_GEMM_X86
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include "gemm_kernel.h"

namespace resnet_fused {
namespace cpu {
namespace gemm {
namespace {
struct Avx2 {
  using reg = __m256;
  // BAhead 32: measured best of 16/32/48 on a Zen 3 (batch 1's cold weights
  // 3-10% faster; batch 8 unchanged; every tile ahead instead of the first
  // only cost batch 8 8.6%). AheadPasses 12, on the same Zen 3: batch 1's
  // Winograd products at 14x14 0.75-0.85x the time, its 1x1 layers at 7x7
  // 0.82-0.93x, resnet50 0.95x; batch 8 unchanged, where every block
  // fetching cost its 1x1 layers 3-4% (docs/performance.md).
  static constexpr int L = 8, MR = 6, NP = 1, BAhead = 32, AheadPasses = 12;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  // not _mm256_broadcast_ss(p): GCC takes that builtin for a read of any memory and
  // then stores every accumulator before each broadcast (half the speed); this is the
  // same vbroadcastss from memory
  static reg broadcast(const float* p) { return _mm256_set1_ps(*p); }
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  // vmaxps returns its second operand unless the first is greater: NaN stays NaN, -0 stays -0
  static reg relu(reg v) { return _mm256_max_ps(_mm256_setzero_ps(), v); }
};
}  // namespace

void block_avx2(const Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, int64_t k0, int64_t k1,
                const Ahead* ahead) {
  block<Avx2>(p, m0, m1, n0, n1, k0, k1, ahead);
}
}  // namespace gemm
}  // namespace cpu
}  // namespace resnet_fused
#pragma GCC pop_options
#endif
