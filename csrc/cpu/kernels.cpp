// The CPU hot loops (see kernels.h). Each exported function picks a loop body
// specialised on its flags (ReLU, residual, sum kind) so the inner loops are
// branch-free, then runs it; the bodies are always inlined into the
// exported function and so compiled once per target clone.
#include "kernels.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

#include "../epilogue.h"
#include "clones.h"

#define RF_ALWAYS_INLINE inline __attribute__((always_inline))

namespace resnet_fused {
namespace cpu {
namespace {

// The bodies take __restrict__ pointers: without it GCC guards each
// vectorised loop with run-time overlap checks, and the in-place epilogue or
// the two halves of one accumulator array fail them and run scalar. What may
// alias is passed once instead: RES = 0 (no residual), 1 (its own buffer) or
// 2 (the input itself); INPLACE: out is the input.
template <typename T, bool RELU, int RES, bool INPLACE, bool /*CENTER: m is a scalar here*/>
RF_ALWAYS_INLINE void run_epilogue_body(const T* __restrict__ in, T* __restrict__ out,
                                        const T* __restrict__ res, int64_t n, acc_type<T> m,
                                        acc_type<T> s, acc_type<T> b) {
  using A = acc_type<T>;
  for (int64_t i = 0; i < n; ++i) {
    const A v = static_cast<A>(INPLACE ? out[i] : in[i]);
    const A r = RES == 0 ? A(0) : RES == 1 ? static_cast<A>(res[i]) : v;
    out[i] = static_cast<T>(scale_shift_add_act<A>(v - m, s, b, r, RELU));
  }
}

template <typename T, bool RELU, int RES, bool INPLACE, bool CENTER>
RF_ALWAYS_INLINE void rows_epilogue_body(const T* __restrict__ in, T* __restrict__ out,
                                         const T* __restrict__ res, int64_t rows, int64_t C,
                                         const acc_type<T>* __restrict__ m,
                                         const acc_type<T>* __restrict__ s,
                                         const acc_type<T>* __restrict__ b) {
  using A = acc_type<T>;
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t base = row * C;
    for (int64_t c = 0; c < C; ++c) {
      const A v = static_cast<A>(INPLACE ? out[base + c] : in[base + c]);
      const A r = RES == 0 ? A(0) : RES == 1 ? static_cast<A>(res[base + c]) : v;
      const A mc = CENTER ? m[c] : A(0);
      out[base + c] = static_cast<T>(scale_shift_add_act<A>(v - mc, s[c], b[c], r, RELU));
    }
  }
}

// One element's contributions to a sum pass.
template <SumKind K, bool RELU, typename T, typename A>
RF_ALWAYS_INLINE void sum_terms(const T* x, const T* g, const T* o, int64_t i, A m, A invstd, A* v) {
  if constexpr (K == SumKind::Value) {
    v[0] = static_cast<A>(x[i]);
  } else if constexpr (K == SumKind::SquaredDeviation) {
    // the deviation rounded to A: exact enough (|x - m| is small against x
    // exactly when cancellation would hurt)
    const A d = static_cast<A>(x[i]) - m;
    v[0] = d * d;
  } else {
    const A dz = relu_backward<A>(static_cast<A>(g[i]), static_cast<A>(o[i]), RELU);
    v[0] = dz;
    v[1] = dz * ((static_cast<A>(x[i]) - m) * invstd);
  }
}

template <typename T, SumKind K, bool RELU>
RF_ALWAYS_INLINE void run_sums_body(const T* __restrict__ x, const T* __restrict__ g,
                                    const T* __restrict__ o, int64_t n, acc_type<T> m,
                                    acc_type<T> invstd, double* out) {
  using A = acc_type<T>;
  constexpr int NK = K == SumKind::Backward ? 2 : 1;
  double total[NK] = {};
  for (int64_t b0 = 0; b0 < n; b0 += kSumBlock) {
    const int64_t len = std::min(n - b0, kSumBlock);
    A lane[NK][kSumLanes] = {};
    A v[NK];
    int64_t i = 0;
    for (; i + kSumLanes <= len; i += kSumLanes) {
      for (int j = 0; j < kSumLanes; ++j) {
        sum_terms<K, RELU>(x, g, o, b0 + i + j, m, invstd, v);
        for (int k = 0; k < NK; ++k) lane[k][j] += v[k];
      }
    }
    for (; i < len; ++i) {
      sum_terms<K, RELU>(x, g, o, b0 + i, m, invstd, v);
      for (int k = 0; k < NK; ++k) lane[k][0] += v[k];
    }
    for (int k = 0; k < NK; ++k)
      for (int j = 0; j < kSumLanes; ++j) total[k] += static_cast<double>(lane[k][j]);
  }
  for (int k = 0; k < NK; ++k) out[k] += total[k];
}

template <typename T, SumKind K, bool RELU>
RF_ALWAYS_INLINE void rows_sums_body(const T* __restrict__ x, const T* __restrict__ g,
                                     const T* __restrict__ o, int64_t rows, int64_t C,
                                     const acc_type<T>* __restrict__ m,
                                     const acc_type<T>* __restrict__ invstd, acc_type<T>* acc) {
  using A = acc_type<T>;
  A* __restrict__ acc0 = acc;      // Σ x, Σ (x - m)² or Σ dz
  A* __restrict__ acc1 = acc + C;  // Σ dz·x̂ (Backward)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t base = row * C;
    for (int64_t c = 0; c < C; ++c) {
      if constexpr (K == SumKind::Value) {
        acc0[c] += static_cast<A>(x[base + c]);
      } else if constexpr (K == SumKind::SquaredDeviation) {
        const A d = static_cast<A>(x[base + c]) - m[c];
        acc0[c] += d * d;
      } else {
        const A dz = relu_backward<A>(static_cast<A>(g[base + c]), static_cast<A>(o[base + c]), RELU);
        acc0[c] += dz;
        acc1[c] += dz * ((static_cast<A>(x[base + c]) - m[c]) * invstd[c]);
      }
    }
  }
}

template <typename T, bool RELU, bool GR>
RF_ALWAYS_INLINE void run_dx_body(const T* __restrict__ g, const T* __restrict__ o,
                                  const T* __restrict__ x, T* __restrict__ gx, T* __restrict__ gr, int64_t n,
                                  acc_type<T> m, acc_type<T> invstd, acc_type<T> mean_dz,
                                  acc_type<T> mean_dz_xhat, acc_type<T> k) {
  using A = acc_type<T>;
  for (int64_t i = 0; i < n; ++i) {
    const A dz = relu_backward<A>(static_cast<A>(g[i]), static_cast<A>(o[i]), RELU);
    const A xhat = (static_cast<A>(x[i]) - m) * invstd;
    gx[i] = static_cast<T>(bn_backward_dx<A>(dz, xhat, mean_dz, mean_dz_xhat, k));
    if (GR) gr[i] = static_cast<T>(dz);
  }
}

template <typename T, bool RELU>
RF_ALWAYS_INLINE void rows_dx_body(const T* __restrict__ g, const T* __restrict__ o,
                                   const T* __restrict__ x, T* __restrict__ gx, int64_t rows, int64_t C,
                                   const acc_type<T>* __restrict__ m, const acc_type<T>* __restrict__ invstd,
                                   const acc_type<T>* __restrict__ mean_dz,
                                   const acc_type<T>* __restrict__ mean_dz_xhat,
                                   const acc_type<T>* __restrict__ k, T* __restrict__ gr, int64_t gr_row,
                                   int64_t c0, int64_t c1) {
  using A = acc_type<T>;
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t base = row * C;
    for (int64_t c = 0; c < C; ++c) {
      const A dz = relu_backward<A>(static_cast<A>(g[base + c]), static_cast<A>(o[base + c]), RELU);
      const A xhat = (static_cast<A>(x[base + c]) - m[c]) * invstd[c];
      gx[base + c] = static_cast<T>(bn_backward_dx<A>(dz, xhat, mean_dz[c], mean_dz_xhat[c], k[c]));
    }
    if (gr) {
      T* dst = gr + row * gr_row - c0;
      for (int64_t c = c0; c < c1; ++c)
        dst[c] = static_cast<T>(relu_backward<A>(static_cast<A>(g[base + c]), static_cast<A>(o[base + c]), RELU));
    }
  }
}

// Max pooling's element type: the storage S the loop moves and the value
// it compares. bf16 is handled on its bits: widening to fp32 is a shift
// (exact), which GCC vectorises where c10::BFloat16's conversion stays scalar.
template <typename T>
struct PoolElem {
  using S = T;
  static RF_ALWAYS_INLINE acc_type<T> value(S v) { return static_cast<acc_type<T>>(v); }
};
template <>
struct PoolElem<c10::BFloat16> {
  using S = uint16_t;
  static RF_ALWAYS_INLINE float value(uint16_t b) {
    const uint32_t w = static_cast<uint32_t>(b) << 16;
    float f;
    __builtin_memcpy(&f, &w, sizeof f);
    return f;
  }
};

// ATen's rule: v replaces the running max m when greater or NaN.
template <typename T, typename S = typename PoolElem<T>::S>
RF_ALWAYS_INLINE S pool_pick(S m, S v) {
  const auto fv = PoolElem<T>::value(v), fm = PoolElem<T>::value(m);
  return (fv > fm || fv != fv) ? v : m;
}

// Folds R window rows (R <= 4) into the running max dst, in order; with
// INIT, dst starts as the first of them instead. Several rows per pass keep
// the running max in registers.
template <typename T, int R, bool INIT>
RF_ALWAYS_INLINE void pool_fold(const T* const* rows, T* dst_, int64_t C) {
  using S = typename PoolElem<T>::S;
  const S* __restrict__ r0 = reinterpret_cast<const S*>(rows[0]);
  const S* __restrict__ r1 = reinterpret_cast<const S*>(rows[R > 1 ? 1 : 0]);
  const S* __restrict__ r2 = reinterpret_cast<const S*>(rows[R > 2 ? 2 : 0]);
  const S* __restrict__ r3 = reinterpret_cast<const S*>(rows[R > 3 ? 3 : 0]);
  S* __restrict__ dst = reinterpret_cast<S*>(dst_);
  for (int64_t c = 0; c < C; ++c) {
    S m = INIT ? r0[c] : pool_pick<T>(dst[c], r0[c]);
    if constexpr (R > 1) m = pool_pick<T>(m, r1[c]);
    if constexpr (R > 2) m = pool_pick<T>(m, r2[c]);
    if constexpr (R > 3) m = pool_pick<T>(m, r3[c]);
    dst[c] = m;
  }
}

template <typename T, bool INIT>
RF_ALWAYS_INLINE void pool_fold_n(const T* const* rows, int64_t n, T* dst, int64_t C) {
  switch (n) {
    case 1: return pool_fold<T, 1, INIT>(rows, dst, C);
    case 2: return pool_fold<T, 2, INIT>(rows, dst, C);
    case 3: return pool_fold<T, 3, INIT>(rows, dst, C);
    default: return pool_fold<T, 4, INIT>(rows, dst, C);
  }
}

}  // namespace

// Calls BODY<T, relu, RES, INPLACE, CENTER>(args) for the aliasing of in, out
// and res. Plain branches, no lambdas: a lambda is a function of its own,
// which the target clones would not cover unless it happened to be inlined.
#define RF_EPILOGUE_CASE(BODY, RELU, RES, CENTER, ...) \
  if (in == out) BODY<T, RELU, RES, true, CENTER>(__VA_ARGS__);   \
  else BODY<T, RELU, RES, false, CENTER>(__VA_ARGS__);
#define RF_EPILOGUE_DISPATCH(BODY, CENTER, ...)                                             \
  const int res_kind = res == nullptr ? 0 : (res == in || res == out) ? 2 : 1;              \
  if (relu) {                                                                               \
    if (res_kind == 0) { RF_EPILOGUE_CASE(BODY, true, 0, CENTER, __VA_ARGS__) }              \
    else if (res_kind == 1) { RF_EPILOGUE_CASE(BODY, true, 1, CENTER, __VA_ARGS__) }         \
    else { RF_EPILOGUE_CASE(BODY, true, 2, CENTER, __VA_ARGS__) }                            \
  } else {                                                                                  \
    if (res_kind == 0) { RF_EPILOGUE_CASE(BODY, false, 0, CENTER, __VA_ARGS__) }             \
    else if (res_kind == 1) { RF_EPILOGUE_CASE(BODY, false, 1, CENTER, __VA_ARGS__) }        \
    else { RF_EPILOGUE_CASE(BODY, false, 2, CENTER, __VA_ARGS__) }                           \
  }

template <typename T>
RF_CPU_CLONES void run_epilogue(const T* in, T* out, const T* res, int64_t n, acc_type<T> m,
                                acc_type<T> s, acc_type<T> b, bool relu) {
  RF_EPILOGUE_DISPATCH(run_epilogue_body, true, in, out, res, n, m, s, b)
}

template <typename T>
RF_CPU_CLONES void rows_epilogue(const T* in, T* out, const T* res, int64_t rows, int64_t C,
                                 const acc_type<T>* m, const acc_type<T>* s, const acc_type<T>* b,
                                 bool relu) {
  if (m) {
    RF_EPILOGUE_DISPATCH(rows_epilogue_body, true, in, out, res, rows, C, m, s, b)
  } else {
    RF_EPILOGUE_DISPATCH(rows_epilogue_body, false, in, out, res, rows, C, m, s, b)
  }
}
#undef RF_EPILOGUE_CASE
#undef RF_EPILOGUE_DISPATCH

template <typename T>
RF_CPU_CLONES void run_sums(SumKind kind, const T* x, const T* g, const T* o, int64_t n,
                            acc_type<T> m, acc_type<T> invstd, bool relu, double* out) {
  switch (kind) {
    case SumKind::Value:
      return run_sums_body<T, SumKind::Value, false>(x, g, o, n, m, invstd, out);
    case SumKind::SquaredDeviation:
      return run_sums_body<T, SumKind::SquaredDeviation, false>(x, g, o, n, m, invstd, out);
    case SumKind::Backward:
      if (relu) return run_sums_body<T, SumKind::Backward, true>(x, g, o, n, m, invstd, out);
      return run_sums_body<T, SumKind::Backward, false>(x, g, o, n, m, invstd, out);
  }
}

template <typename T>
RF_CPU_CLONES void rows_sums(SumKind kind, const T* x, const T* g, const T* o, int64_t rows,
                             int64_t C, const acc_type<T>* m, const acc_type<T>* invstd, bool relu,
                             acc_type<T>* acc) {
  switch (kind) {
    case SumKind::Value:
      return rows_sums_body<T, SumKind::Value, false>(x, g, o, rows, C, m, invstd, acc);
    case SumKind::SquaredDeviation:
      return rows_sums_body<T, SumKind::SquaredDeviation, false>(x, g, o, rows, C, m, invstd, acc);
    case SumKind::Backward:
      if (relu) return rows_sums_body<T, SumKind::Backward, true>(x, g, o, rows, C, m, invstd, acc);
      return rows_sums_body<T, SumKind::Backward, false>(x, g, o, rows, C, m, invstd, acc);
  }
}

template <typename T>
RF_CPU_CLONES void run_dx(const T* g, const T* o, const T* x, T* gx, T* gr, int64_t n,
                          acc_type<T> m, acc_type<T> invstd, acc_type<T> mean_dz,
                          acc_type<T> mean_dz_xhat, acc_type<T> k, bool relu) {
  if (relu) {
    if (gr) run_dx_body<T, true, true>(g, o, x, gx, gr, n, m, invstd, mean_dz, mean_dz_xhat, k);
    else run_dx_body<T, true, false>(g, o, x, gx, gr, n, m, invstd, mean_dz, mean_dz_xhat, k);
  } else {
    if (gr) run_dx_body<T, false, true>(g, o, x, gx, gr, n, m, invstd, mean_dz, mean_dz_xhat, k);
    else run_dx_body<T, false, false>(g, o, x, gx, gr, n, m, invstd, mean_dz, mean_dz_xhat, k);
  }
}

template <typename T>
RF_CPU_CLONES void rows_dx(const T* g, const T* o, const T* x, T* gx, int64_t rows, int64_t C,
                           const acc_type<T>* m, const acc_type<T>* invstd,
                           const acc_type<T>* mean_dz, const acc_type<T>* mean_dz_xhat,
                           const acc_type<T>* k, bool relu, T* gr, int64_t gr_row, int64_t c0,
                           int64_t c1) {
  if (relu) rows_dx_body<T, true>(g, o, x, gx, rows, C, m, invstd, mean_dz, mean_dz_xhat, k, gr, gr_row, c0, c1);
  else rows_dx_body<T, false>(g, o, x, gx, rows, C, m, invstd, mean_dz, mean_dz_xhat, k, gr, gr_row, c0, c1);
}

template <typename T>
RF_CPU_CLONES void pool_max_rows(const T* start, int64_t step, const int64_t* offsets, int64_t count,
                                 int64_t pixels, T* out, int64_t C) {
  for (int64_t p = 0; p < pixels; ++p) {
    const T* base = start + p * step;
    T* dst = out + p * C;
    for (int64_t k = 0; k < count; k += 4) {
      const int64_t n = std::min<int64_t>(count - k, 4);
      const T* rows[4];
      for (int64_t j = 0; j < n; ++j) rows[j] = base + offsets[k + j];
      if (k == 0) pool_fold_n<T, true>(rows, n, dst, C);
      else pool_fold_n<T, false>(rows, n, dst, C);
    }
  }
}

#define RF_INSTANTIATE(T)                                                                          \
  template void pool_max_rows<T>(const T*, int64_t, const int64_t*, int64_t, int64_t, T*, int64_t); \
  template void run_epilogue<T>(const T*, T*, const T*, int64_t, acc_type<T>, acc_type<T>,        \
                                acc_type<T>, bool);                                                \
  template void rows_epilogue<T>(const T*, T*, const T*, int64_t, int64_t, const acc_type<T>*,    \
                                 const acc_type<T>*, const acc_type<T>*, bool);                    \
  template void run_sums<T>(SumKind, const T*, const T*, const T*, int64_t, acc_type<T>,          \
                            acc_type<T>, bool, double*);                                           \
  template void rows_sums<T>(SumKind, const T*, const T*, const T*, int64_t, int64_t,             \
                             const acc_type<T>*, const acc_type<T>*, bool, acc_type<T>*);          \
  template void run_dx<T>(const T*, const T*, const T*, T*, T*, int64_t, acc_type<T>, acc_type<T>, \
                          acc_type<T>, acc_type<T>, acc_type<T>, bool);                            \
  template void rows_dx<T>(const T*, const T*, const T*, T*, int64_t, int64_t, const acc_type<T>*, \
                           const acc_type<T>*, const acc_type<T>*, const acc_type<T>*,             \
                           const acc_type<T>*, bool, T*, int64_t, int64_t, int64_t);

const char* kernel_targets() { return RF_CPU_TARGETS; }

RF_INSTANTIATE(float)
RF_INSTANTIATE(double)
RF_INSTANTIATE(c10::BFloat16)
RF_INSTANTIATE(c10::Half)
#undef RF_INSTANTIATE

}  // namespace cpu
}  // namespace resnet_fused
