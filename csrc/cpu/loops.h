// CPU loop skeletons shared by the epilogue and batch_norm_act kernels: how
// an element-wise pass and the per-channel sums split NCHW and channels_last
// dense tensors over threads. The loop bodies are in kernels.h.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "kernels.h"

namespace resnet_fused {
namespace cpu {

// Roughly 32K elements per task: enough to spread a 56x56x64 feature map over
// several threads, large enough that scheduling costs stay negligible.
constexpr int64_t kGrainElements = 32768;

// NCHW: calls plane_fn(c, begin, end) for each (n, c) plane of HW elements,
// which share channel c. channels_last: calls rows_fn(row_begin, row_end) for
// a block of pixels' rows of C elements (channel = offset in the row), so the
// callee's inner loop over c is contiguous and vectorisable.
template <typename PlaneFn, typename RowsFn>
void for_each_channel_run(bool channels_last, int64_t N, int64_t C, int64_t HW,
                          const PlaneFn& plane_fn, const RowsFn& rows_fn) {
  if (channels_last) {
    const int64_t rows = N * HW;
    const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(C, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) { rows_fn(begin, end); });
  } else {
    const int64_t planes = N * C;
    const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(HW, 1));
    at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) plane_fn(p % C, p * HW, p * HW + HW);
    });
  }
}

// Per-channel sums (kernels.h SumKind: K = 1 quantity, or 2 for Backward):
// returns sums[k * C + c] in double. Accumulation is two-level so the hot
// loop vectorises and stays exact enough: fp32 (acc_type) partial sums over
// short fixed blocks — kSumLanes interleaved lanes along an NCHW plane, one
// lane per channel along channels_last rows — each block's result then added
// in double. Blocks are fixed by the shape alone (never by the thread count)
// and combined in order, so the result is identical whatever
// torch.get_num_threads() is. g and o (Backward only) may be null otherwise;
// m and invstd are per channel (null where the kind does not read them).
template <typename T>
std::vector<double> channel_sums(SumKind kind, bool channels_last, int64_t N, int64_t C, int64_t HW,
                                 const T* x, const T* g, const T* o, const acc_type<T>* m,
                                 const acc_type<T>* invstd, bool relu) {
  using A = acc_type<T>;
  const int K = kind == SumKind::Backward ? 2 : 1;
  std::vector<double> sums(static_cast<size_t>(C) * K, 0.0);
  if (!channels_last) {
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        double total[2] = {0.0, 0.0};
        for (int64_t n = 0; n < N; ++n) {
          const int64_t base = (n * C + c) * HW;
          run_sums<T>(kind, x + base, g ? g + base : nullptr, o ? o + base : nullptr, HW,
                      m ? m[c] : A(0), invstd ? invstd[c] : A(0), relu, total);
        }
        for (int k = 0; k < K; ++k) sums[k * C + c] = total[k];
      }
    });
    return sums;
  }
  const int64_t rows = N * HW;
  constexpr int64_t kRowsPerChunk = 64;  // fp32 partial sums over 64 rows
  const int64_t chunks = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
  std::vector<double> partial(static_cast<size_t>(chunks) * C * K, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> acc(static_cast<size_t>(C) * K);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      std::fill(acc.begin(), acc.end(), A(0));
      const int64_t r0 = chunk * kRowsPerChunk, r1 = std::min(rows, r0 + kRowsPerChunk);
      rows_sums<T>(kind, x + r0 * C, g ? g + r0 * C : nullptr, o ? o + r0 * C : nullptr, r1 - r0, C,
                   m, invstd, relu, acc.data());
      double* out = partial.data() + chunk * C * K;
      for (int64_t j = 0; j < C * K; ++j) out[j] = static_cast<double>(acc[j]);
    }
  });
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const double* p = partial.data() + chunk * C * K;
    for (int64_t j = 0; j < C * K; ++j) sums[j] += p[j];
  }
  return sums;
}

}  // namespace cpu
}  // namespace resnet_fused
