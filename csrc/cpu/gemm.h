// The CPU GEMM behind the 1x1 convolutions and the Winograd products:
//   C[m, n] = act(sum_k A[m, k] * B[k, n] + bias[n] + R[m, n])
// with A the channels_last activations (a row of K channels per pixel, read
// in place, strided rows for a stride-2 1x1 convolution), B the weights
// packed once into panels of kPanel columns, and the epilogue (bias,
// residual, ReLU that keeps NaN) applied to the accumulators before their
// one store.
//
// Every output is one fused multiply-add chain over k in order 0..K-1,
// whatever the ISA, the register tile, the cache blocking or the thread
// split: the AVX-512, AVX2 and generic kernels give the same bits, and so
// does any thread count. NaN and infinity propagate as in a direct
// convolution (every product is formed; the ReLU keeps NaN).
//
// This header has no ATen: the ISA files (gemm_avx512.cpp, gemm_avx2.cpp,
// gemm_generic.cpp) compile the kernel of gemm_kernel.h for their
// instruction set; gemm.cpp plans the blocking and the threads.
#pragma once

#include <cstdint>

// The vector kernels are compiled with GCC's `#pragma GCC target` (x86-64);
// elsewhere (another compiler or architecture) only the generic one exists.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RF_GEMM_X86 1
#else
#define RF_GEMM_X86 0
#endif

namespace resnet_fused {
namespace cpu {
namespace gemm {

// B is packed in panels of kPanel columns (the last one narrower where N is
// not a multiple of it): panel p holds columns [64p, 64p + w), w = min(64,
// N - 64p), its row k the w consecutive floats at b + 64p * K + k * w — one
// stream of B per tile whatever the ISA's tile width. N must be a multiple of
// kColumns.
constexpr int64_t kPanel = 64;
constexpr int64_t kColumns = 16;

// The rows of A: row m is pixel m of the output map (N, P, Q); it starts at
// input pixel (n, p * stride, q * stride) of the (N, H, W) map, lda floats
// apart (stride 1 and P, Q = H, W: row m at a + m * lda). Its K values are
// contiguous from there, or, where `run` > 0, come in runs of `run` values,
// run r at r * run_stride from the row's start: a k x k convolution over a
// zero-padded channels_last input (conv_gemm.cpp) reads for each of its R
// kernel rows the S * C contiguous values under it (run S * C, run_stride
// one input row).
struct Rows {
  const float* a;
  int64_t lda;
  int64_t stride;  // 1, or the convolution's stride
  int64_t H, W, P, Q;
  int64_t run = 0, run_stride = 0;
  // a row-major matrix, rows lda floats apart
  static Rows matrix(const float* a, int64_t lda) { return {a, lda, 1, 0, 0, 0, 0}; }
  const float* row(int64_t m) const {
    if (stride == 1 && H == P && W == Q) return a + m * lda;
    const int64_t q = m % Q, t = m / Q, p = t % P, n = t / P;
    return a + ((n * H + p * stride) * W + q * stride) * lda;
  }
};

struct Problem {
  Rows rows;
  int64_t K;
  const float* b;         // packed (see kPanel)
  int64_t N;              // columns of B
  const float* bias;      // N values, or null
  const float* residual;  // M x N, row m at residual + m * ldr, or null; may be c itself
  int64_t ldr;
  float* c;  // M x N, row m at c + m * ldc
  int64_t ldc;
  bool relu;
};

// C = A·B over K, no epilogue (bias, residual and ReLU set after, where wanted)
inline Problem product(const Rows& rows, int64_t K, const float* b, int64_t N, float* c, int64_t ldc) {
  return {rows, K, b, N, nullptr, nullptr, 0, c, ldc, false};
}

// The lines of B that a block fetches into cache while it runs: those of the
// block its thread runs next (gemm.cpp), so that block does not meet its B
// cold (at batch 1 every weight comes from memory once per forward). At
// most kSpans contiguous spans (one per panel) and kBytes in all; the tiles
// spread the fetches over their k steps, in 16-step chunks. Only a block of
// at most the ISA's AheadPasses row tiles fetches (gemm_kernel.h): there the
// first pass over B, which waits on memory, is a large part of the block;
// with more rows the fetched lines only crowd the block's own B out of L2.
struct Ahead {
  static constexpr int kSpans = 16;
  static constexpr int64_t kBytes = 256 << 10;
  const char* begin[kSpans] = {};
  int64_t lines[kSpans] = {};  // 64-byte lines from begin[s]
  int spans = 0;
  int64_t total = 0;  // lines over all spans
};

// The block of B that C[:, n0:n1] reads for k in [k0, k1) (n0 a multiple of
// kPanel), as Ahead's spans: its rows of each panel, panel by panel, cut at
// Ahead::kBytes.
inline Ahead ahead_of(const Problem& p, int64_t n0, int64_t n1, int64_t k0, int64_t k1) {
  Ahead a;
  int64_t room = Ahead::kBytes / 64;
  for (int64_t panel = n0; panel < n1 && a.spans < Ahead::kSpans && room > 0 && k1 > k0; panel += kPanel) {
    const int64_t w = p.N - panel < kPanel ? p.N - panel : kPanel;
    const char* first = reinterpret_cast<const char*>(p.b + panel * p.K + k0 * w);
    const char* last = reinterpret_cast<const char*>(p.b + panel * p.K + k1 * w);
    const uintptr_t line0 = reinterpret_cast<uintptr_t>(first) & ~uintptr_t(63);
    int64_t lines = static_cast<int64_t>((reinterpret_cast<uintptr_t>(last) - line0 + 63) / 64);
    lines = lines < room ? lines : room;
    a.begin[a.spans] = reinterpret_cast<const char*>(line0);
    a.lines[a.spans++] = lines;
    a.total += lines;
    room -= lines;
  }
  return a;
}

// One block of a product: C[m0:m1, n0:n1] for k in [k0, k1) of *p
struct Block {
  const Problem* p;
  int64_t m0, m1, n0, n1, k0, k1;
};

// C[m0:m1, n0:n1] for k in [k0, k1): the accumulators start at 0 when k0 is
// 0, else from C (the partial sums the block before stored); the epilogue
// runs when k1 is K, else the partial sums are stored. n0 and n1 are
// multiples of kColumns. `ahead` (or null): lines to fetch meanwhile.
using BlockFn = void (*)(const Problem&, int64_t m0, int64_t m1, int64_t n0, int64_t n1, int64_t k0, int64_t k1,
                         const Ahead* ahead);

void block_avx512(const Problem&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const Ahead*);
void block_avx2(const Problem&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const Ahead*);
void block_generic(const Problem&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const Ahead*);

}  // namespace gemm
}  // namespace cpu
}  // namespace resnet_fused
