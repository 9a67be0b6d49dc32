// CPU loop skeletons shared by the epilogue and batch_norm_act kernels: an
// element-wise pass with per-channel parameters, and per-channel sums, both
// for NCHW and channels_last dense tensors.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace resnet_fused {
namespace cpu {

// Roughly 32K elements per task: enough to spread a 56x56x64 feature map over
// several threads, large enough that scheduling costs stay negligible.
constexpr int64_t kGrainElements = 32768;

// NCHW: calls plane_fn(c, begin, end) for each (n, c) plane of HW elements,
// which share channel c. channels_last: calls row_fn(begin) for each pixel's
// row of C elements (channel = offset in the row), so the callee's inner loop
// over c is contiguous and vectorisable.
template <typename PlaneFn, typename RowFn>
void for_each_channel_run(bool channels_last, int64_t N, int64_t C, int64_t HW,
                          const PlaneFn& plane_fn, const RowFn& row_fn) {
  if (channels_last) {
    const int64_t rows = N * HW;
    const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(C, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) row_fn(row * C);
    });
  } else {
    const int64_t planes = N * C;
    const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(HW, 1));
    at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) plane_fn(p % C, p * HW, p * HW + HW);
    });
  }
}

// Per-channel sums of K quantities: returns sums[c * K + k].
// accumulate(c, i, acc) adds element i's (channel c) contributions to acc[0..K).
// The work is split into chunks fixed by the shape alone (never by the thread
// count) and chunk results are added in order, so the result is identical
// whatever torch.get_num_threads() is.
template <int K, typename Accumulate>
std::vector<double> channel_sums(bool channels_last, int64_t N, int64_t C, int64_t HW,
                                 const Accumulate& accumulate) {
  std::vector<double> sums(static_cast<size_t>(C) * K, 0.0);
  if (!channels_last) {
    // One channel per task: its N planes are summed in order.
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        double acc[K] = {};
        for (int64_t n = 0; n < N; ++n) {
          const int64_t base = (n * C + c) * HW;
          for (int64_t i = base; i < base + HW; ++i) accumulate(c, i, acc);
        }
        for (int k = 0; k < K; ++k) sums[c * K + k] = acc[k];
      }
    });
    return sums;
  }
  const int64_t rows = N * HW;
  constexpr int64_t kRowsPerChunk = 256;
  const int64_t chunks = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
  std::vector<double> partial(static_cast<size_t>(chunks) * C * K, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      double* acc = partial.data() + chunk * C * K;
      const int64_t row_end = std::min(rows, (chunk + 1) * kRowsPerChunk);
      for (int64_t row = chunk * kRowsPerChunk; row < row_end; ++row) {
        const int64_t base = row * C;
        for (int64_t c = 0; c < C; ++c) accumulate(c, base + c, acc + c * K);
      }
    }
  });
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const double* acc = partial.data() + chunk * C * K;
    for (int64_t j = 0; j < C * K; ++j) sums[j] += acc[j];
  }
  return sums;
}

}  // namespace cpu
}  // namespace resnet_fused
