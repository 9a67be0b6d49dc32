// gemm_kernel.h for any CPU: one float per "vector", std::fma for the
// multiply-add (correctly rounded, so the same bits as the vector kernels;
// slow without hardware FMA — the planner uses it only where neither AVX2
// nor AVX-512 is there, and the tests use it as the kernels' reference).
#include <cmath>
#include <utility>

#include "gemm.h"
#include "gemm_kernel.h"

namespace resnet_fused {
namespace cpu {
namespace gemm {
namespace {
struct Generic {
  using reg = float;
  static constexpr int L = 1, MR = 2, NP = 1, BAhead = 0, AheadPasses = 0;
  static reg zero() { return 0.f; }
  static reg load(const float* p) { return *p; }
  static void store(float* p, reg v) { *p = v; }
  static reg broadcast(const float* p) { return *p; }
  static reg fma(reg a, reg b, reg c) { return std::fma(a, b, c); }
  static reg add(reg a, reg b) { return a + b; }
  static reg relu(reg v) { return v < 0.f ? 0.f : v; }  // NaN stays NaN, -0 stays -0
};
}  // namespace

void block_generic(const Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, int64_t k0, int64_t k1,
                   const Ahead* ahead) {
  block<Generic>(p, m0, m1, n0, n1, k0, k1, ahead);
}
}  // namespace gemm
}  // namespace cpu
}  // namespace resnet_fused
