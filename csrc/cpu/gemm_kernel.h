// The register-tiled kernel of gemm.h, written once over an ISA's traits and
// compiled by each ISA file inside its `#pragma GCC target` region (so it
// must include nothing but gemm.h: a header compiled here would be compiled
// for this ISA). Traits I give the vector type and its operations, the
// vector width L (floats), MR (rows per tile), NP (16-column groups per
// tile, within one panel of B), BAhead (how many k steps ahead the first
// tile over a block of B fetches B's lines; 0: not at all) and AheadPasses
// (a block of at most this many row tiles fetches the next block's B, gemm.h
// Ahead; 0: none does).
//
// A tile of MR rows x NP * kColumns columns keeps its MR x NP * kColumns / L
// accumulators in registers over its k block: per k, one vector load per L
// columns of B, one broadcast per row of A, then a fused multiply-add per
// accumulator — the sum over k of each output is the same chain of
// multiply-adds in every kernel (gemm.h).
#pragma once

#include "gemm.h"

namespace resnet_fused {
namespace cpu {
namespace gemm {
namespace {

// `next`: the rows of the tile after this one (or null), fetched into cache
// a line per row every 16 k, so that their loads do not stall the next
// tile; the lines this tile's epilogue reads and writes are fetched at its
// start. `ColdB`: this tile is the first over its block of B, which then
// comes from memory (at batch 1 every weight is read once per forward and
// the whole model's weights exceed L3), so B's lines are fetched I::BAhead
// k steps before their loads. `pf`: `pf_n` lines of the next block's B
// (gemm.h Ahead), fetched ceil(pf_n / (kc / 16)) at the start of each 16 k
// steps (all after the k loop where kc < 16).
template <class I, int MR, int NP, bool ColdB = false>
__attribute__((always_inline)) inline void tile(const Problem& p, const float* const* rows, const float* const* next,
                                                int64_t m, int64_t n, int64_t k0, int64_t k1, const char* pf,
                                                int64_t pf_n) {
  using R = typename I::reg;
  constexpr int VP = kColumns / I::L;  // vectors per 16 columns
  constexpr int NV = NP * VP;
  const int64_t panel = n / kPanel * kPanel;
  const int64_t ldb = p.N - panel < kPanel ? p.N - panel : kPanel;
  const float* b = p.b + panel * p.K + k0 * ldb + (n - panel);
  const float* a[MR];  // per run of A (Rows::run): a[i][k] is A's (row i, k0 + k)
  R acc[MR][NV];
  if (k0 == 0) {
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NV; ++j) acc[i][j] = I::zero();
  } else {
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NV; ++j) acc[i][j] = I::load(p.c + (m + i) * p.ldc + n + j * I::L);
  }
  if (k1 == p.K) {
    for (int i = 0; i < MR; ++i)
      for (int q = 0; q < NP; ++q) {
        __builtin_prefetch(p.c + (m + i) * p.ldc + n + q * kColumns, 1);
        if (p.residual) __builtin_prefetch(p.residual + (m + i) * p.ldr + n + q * kColumns);
      }
  }
  const int64_t kc = k1 - k0;
  const int64_t k_ahead_end = kc - I::BAhead;  // below it, the line BAhead steps ahead is in this k block
  auto step = [&](int64_t k) __attribute__((always_inline)) {
    if constexpr (ColdB) {
      if (k < k_ahead_end)
        for (int q = 0; q < NP; ++q) __builtin_prefetch(b + (k + I::BAhead) * ldb + q * kColumns);
    }
    R bv[NV];
    for (int q = 0; q < NP; ++q)
      for (int v = 0; v < VP; ++v) bv[q * VP + v] = I::load(b + k * ldb + q * kColumns + v * I::L);
    for (int i = 0; i < MR; ++i) {
      const R av = I::broadcast(a[i] + k);
      for (int j = 0; j < NV; ++j) acc[i][j] = I::fma(av, bv[j], acc[i][j]);
    }
  };
  // the k steps [k, end) with A's (row i, k0 + k) at rows[i] + off + k
  auto span = [&](int64_t k, int64_t end, int64_t off) __attribute__((always_inline)) {
    for (int i = 0; i < MR; ++i) a[i] = rows[i] + off;
    if (next || pf_n > 0) {
      const int64_t chunks = kc / 16, per_chunk = chunks > 0 ? (pf_n + chunks - 1) / chunks : 0;
      for (; k + 16 <= end; k += 16) {
        if (next)
          for (int i = 0; i < MR; ++i) __builtin_prefetch(next[i] + off + k);
        for (int64_t j = 0; j < per_chunk && pf_n > 0; ++j, --pf_n, pf += 64) __builtin_prefetch(pf, 0, 2);
        for (int64_t kk = k; kk < k + 16; ++kk) step(kk);
      }
    }
    for (; k < end; ++k) step(k);
  };
  if (p.rows.run == 0) {
    span(0, kc, k0);  // A's rows contiguous: the 1x1 and Winograd products
  } else {
    for (int64_t k = 0; k < kc;) {  // run by run (Rows::run)
      const int64_t r = (k0 + k) / p.rows.run, run_end = (r + 1) * p.rows.run - k0, end = run_end < kc ? run_end : kc;
      span(k, end, r * p.rows.run_stride + (k0 + k) % p.rows.run - k);
      k = end;
    }
  }
  for (; pf_n > 0; --pf_n, pf += 64) __builtin_prefetch(pf, 0, 2);  // those kc steps did not reach
  if (k1 < p.K) {
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NV; ++j) I::store(p.c + (m + i) * p.ldc + n + j * I::L, acc[i][j]);
    return;
  }
  // the epilogue: + bias, + residual, ReLU (NaN stays NaN), one store
  for (int j = 0; j < NV; ++j) {
    const R bias = p.bias ? I::load(p.bias + n + j * I::L) : I::zero();
    for (int i = 0; i < MR; ++i) {
      R v = acc[i][j];
      if (p.bias) v = I::add(v, bias);
      if (p.residual) v = I::add(v, I::load(p.residual + (m + i) * p.ldr + n + j * I::L));
      if (p.relu) v = I::relu(v);
      I::store(p.c + (m + i) * p.ldc + n + j * I::L, v);
    }
  }
}

template <class I, int MR, int NP>
void tile_fn(const Problem& p, const float* const* rows, const float* const* next, int64_t m, int64_t n, int64_t k0,
             int64_t k1, const char* pf, int64_t pf_n) {
  tile<I, MR, NP>(p, rows, next, m, n, k0, k1, pf, pf_n);
}

using TileFn = void (*)(const Problem&, const float* const*, const float* const*, int64_t, int64_t, int64_t, int64_t,
                        const char*, int64_t);

template <class I, int MR, int... NPs>
constexpr void fill_row(TileFn (&row)[I::NP], std::integer_sequence<int, NPs...>) {
  ((row[NPs] = &tile_fn<I, MR, NPs + 1>), ...);
}

// table[mr - 1][np - 1]: the tile for the last rows and panels of a block
template <class I>
struct Tiles {
  TileFn table[I::MR][I::NP];
  template <int... MRs>
  constexpr explicit Tiles(std::integer_sequence<int, MRs...>) : table{} {
    (fill_row<I, MRs + 1>(table[MRs], std::make_integer_sequence<int, I::NP>{}), ...);
  }
};

// Tiles of rows in turn, each over all of the block's columns: the block of
// B (kc x nc, gemm.cpp plan) stays in L2, the tile's rows in L1. The lines
// of `ahead` are shared out over the tiles, each tile's a contiguous run
// within one span.
template <class I>
void block(const Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, int64_t k0, int64_t k1,
           const Ahead* ahead) {
  static constexpr Tiles<I> tiles(std::make_integer_sequence<int, I::MR>{});
  constexpr int64_t NW = I::NP * kColumns;
  int64_t per_tile = 0, span = 0, done = 0;  // lines per tile; the span and line fetched next
  const int64_t passes = (m1 - m0 + I::MR - 1) / I::MR;  // row tiles, each a pass over the block of B
  if (ahead && ahead->total > 0 && passes <= I::AheadPasses) {
    const int64_t count = passes * ((n1 - n0 + NW - 1) / NW);
    const int64_t share = count > ahead->spans ? count - ahead->spans : 1;  // a span's end may waste a tile's share
    per_tile = (ahead->total + share - 1) / share;
  }
  auto fetch = [&](const char*& pf) __attribute__((always_inline)) -> int64_t {
    if (per_tile == 0 || span == ahead->spans) return 0;
    const int64_t left = ahead->lines[span] - done, n = per_tile < left ? per_tile : left;
    pf = ahead->begin[span] + done * 64;
    done += n;
    if (done == ahead->lines[span]) ++span, done = 0;
    return n;
  };
  const float* rows[2][I::MR];
  int cur = 0;
  int64_t mr = m1 - m0 < I::MR ? m1 - m0 : I::MR;
  for (int64_t i = 0; i < mr; ++i) rows[cur][i] = p.rows.row(m0 + i);
  for (int64_t m = m0; m < m1; m += I::MR) {
    // the next tile's rows, fetched while the first columns of this one run
    const int64_t mn = m + I::MR;
    const int64_t mr_next = m1 - mn < I::MR ? m1 - mn : I::MR;
    for (int64_t i = 0; i < mr_next; ++i) rows[cur ^ 1][i] = p.rows.row(mn + i);
    const bool full_next = mr_next == I::MR;
    for (int64_t n = n0; n < n1; n += NW) {
      const float* const* next = full_next && n == n0 ? rows[cur ^ 1] : nullptr;
      const int64_t np = (n1 - n) / kColumns < I::NP ? (n1 - n) / kColumns : I::NP;
      const char* pf = nullptr;
      const int64_t pf_n = fetch(pf);
      if (mr == I::MR && np == I::NP && m == m0)
        tile<I, I::MR, I::NP, (I::BAhead > 0)>(p, rows[cur], next, m, n, k0, k1, pf, pf_n);
      else if (mr == I::MR && np == I::NP)
        tile<I, I::MR, I::NP>(p, rows[cur], next, m, n, k0, k1, pf, pf_n);
      else
        tiles.table[mr - 1][np - 1](p, rows[cur], next, m, n, k0, k1, pf, pf_n);
    }
    cur ^= 1;
    mr = mr_next;
  }
}

}  // namespace
}  // namespace gemm
}  // namespace cpu
}  // namespace resnet_fused
