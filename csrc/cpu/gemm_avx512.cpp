// gemm_kernel.h for AVX-512: 6 rows x 64 columns per tile (24 zmm
// accumulators, 4 for B, 1 broadcast).
#include <utility>

#include "gemm.h"

#if RF_GEMM_X86
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,fma")
// GCC 12 flags _mm512_undefined_ps inside its own intrinsics header
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "gemm_kernel.h"

namespace resnet_fused {
namespace cpu {
namespace gemm {
namespace {
struct Avx512 {
  using reg = __m512;
  // BAhead and AheadPasses 0 (no fetching ahead): measured on a Zen 3 with
  // AVX2 only (gemm_avx2.cpp), not on an AVX-512 machine
  static constexpr int L = 16, MR = 6, NP = 4, BAhead = 0, AheadPasses = 0;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static reg broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  // vmaxps returns its second operand unless the first is greater: NaN stays NaN, -0 stays -0
  static reg relu(reg v) { return _mm512_max_ps(_mm512_setzero_ps(), v); }
};
}  // namespace

void block_avx512(const Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, int64_t k0, int64_t k1,
                  const Ahead* ahead) {
  block<Avx512>(p, m0, m1, n0, n1, k0, k1, ahead);
}
}  // namespace gemm
}  // namespace cpu
}  // namespace resnet_fused
#pragma GCC pop_options
#endif
