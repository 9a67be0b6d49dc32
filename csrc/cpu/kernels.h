// Hot loops of the CPU kernels: the element-wise epilogue, the per-channel
// sums of train-mode BatchNorm and its dx pass, each over either one run of
// elements that share a channel (an NCHW plane) or a block of channels_last
// rows (C channels per row).
//
// They are plain loops over raw pointers that GCC vectorises (the report:
// `RESNET_FUSED_VEC_REPORT=1 pip install .`), compiled for AVX-512, AVX2 and
// baseline x86-64 (target_clones; the CPU picks one when the library loads).
// Sums keep a fixed lane layout and the build uses -ffp-contract=off, so every
// clone gives the same bits. Threads are the caller's business
// (at::parallel_for in loops.h), so these know nothing of ATen.
//
// T is the storage type (float, double, c10::BFloat16, c10::Half); A is its
// accumulation type (at::opmath_type<T>: double for double, float otherwise).
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

namespace resnet_fused {
namespace cpu {

template <typename T>
using acc_type = at::opmath_type<T>;

// Elements per fp32 partial sum along a run; within it, kSumLanes interleaved
// lanes (i mod kSumLanes) so the loop vectorises without reassociation.
constexpr int64_t kSumBlock = 512;
constexpr int kSumLanes = 16;

// What a sum pass adds up, per element: x; (x - m)²; or the two backward
// sums dz and dz·x̂ (dz = ReLU'(out)·g, x̂ = (x - m)·invstd).
enum class SumKind { Value, SquaredDeviation, Backward };

// out[i] = act((in[i] - m) * s + b + res[i]) for one run; res may be null,
// out may be in.
template <typename T>
void run_epilogue(const T* in, T* out, const T* res, int64_t n, acc_type<T> m, acc_type<T> s,
                  acc_type<T> b, bool relu);

// The same over `rows` rows of C channels with per-channel m (may be null:
// 0), s and b.
template <typename T>
void rows_epilogue(const T* in, T* out, const T* res, int64_t rows, int64_t C,
                   const acc_type<T>* m, const acc_type<T>* s, const acc_type<T>* b, bool relu);

// Sums over one run: out[0] (and out[1] for Backward) += the run's sums, in
// double across blocks of kSumBlock. g and o are read by Backward only.
template <typename T>
void run_sums(SumKind kind, const T* x, const T* g, const T* o, int64_t n, acc_type<T> m,
              acc_type<T> invstd, bool relu, double* out);

// Sums over rows: acc[k * C + c] += the rows' sums (in A, one lane per
// channel); m and invstd per channel (m unused by Value).
template <typename T>
void rows_sums(SumKind kind, const T* x, const T* g, const T* o, int64_t rows, int64_t C,
               const acc_type<T>* m, const acc_type<T>* invstd, bool relu, acc_type<T>* acc);

// BatchNorm backward dx over one run: gx[i] = bn_backward_dx(dz, x̂, ...),
// and gr[i] = dz where gr is not null.
template <typename T>
void run_dx(const T* g, const T* o, const T* x, T* gx, T* gr, int64_t n, acc_type<T> m,
            acc_type<T> invstd, acc_type<T> mean_dz, acc_type<T> mean_dz_xhat, acc_type<T> k,
            bool relu);

// The same over rows, per-channel parameters; when gr is not null, channels
// [c0, c1) of each row also go to gr[row * gr_row + (c - c0)].
template <typename T>
void rows_dx(const T* g, const T* o, const T* x, T* gx, int64_t rows, int64_t C,
             const acc_type<T>* m, const acc_type<T>* invstd, const acc_type<T>* mean_dz,
             const acc_type<T>* mean_dz_xhat, const acc_type<T>* k, bool relu, T* gr,
             int64_t gr_row, int64_t c0, int64_t c1);

// Max pooling over channels_last rows of C channels, for `pixels` output
// pixels whose windows have the same shape: pixel p's window is the `count`
// (>= 1) input rows start + p * step + offsets[k], in window order, and
// out[p * C + c] is their max with ATen's rule: a value replaces the running
// max when it is greater or NaN (so NaN propagates and ties keep the first).
template <typename T>
void pool_max_rows(const T* start, int64_t step, const int64_t* offsets, int64_t count,
                   int64_t pixels, T* out, int64_t C);

}  // namespace cpu
}  // namespace resnet_fused
