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

// Per-channel sums of K quantities: returns sums[k * C + c] (double).
// values(c, i, v) writes element i's (channel c) K contributions to v[0..K),
// in acc_t. Accumulation is two-level so the hot loop vectorises and stays
// exact enough: fp32 (acc_t) partial sums over short fixed blocks — 8
// independent lanes along an NCHW plane, one lane per channel along
// channels_last rows — each block's result then added in double. Blocks are
// fixed by the shape alone (never by the thread count) and combined in
// order, so the result is identical whatever torch.get_num_threads() is.
template <int K, typename acc_t, typename Values>
std::vector<double> channel_sums(bool channels_last, int64_t N, int64_t C, int64_t HW,
                                 const Values& values) {
  std::vector<double> sums(static_cast<size_t>(C) * K, 0.0);
  if (!channels_last) {
    constexpr int kLanes = 8;
    constexpr int64_t kBlock = 512;  // elements per fp32 partial sum: 64 per lane
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        double total[K] = {};
        for (int64_t n = 0; n < N; ++n) {
          const int64_t base = (n * C + c) * HW;
          for (int64_t b0 = 0; b0 < HW; b0 += kBlock) {
            const int64_t b1 = std::min(HW, b0 + kBlock);
            acc_t lane[K][kLanes] = {};
            acc_t v[K];
            int64_t i = b0;
            for (; i + kLanes <= b1; i += kLanes) {
              for (int j = 0; j < kLanes; ++j) {
                values(c, base + i + j, v);
                for (int k = 0; k < K; ++k) lane[k][j] += v[k];
              }
            }
            for (; i < b1; ++i) {
              values(c, base + i, v);
              for (int k = 0; k < K; ++k) lane[k][0] += v[k];
            }
            for (int k = 0; k < K; ++k)
              for (int j = 0; j < kLanes; ++j) total[k] += static_cast<double>(lane[k][j]);
          }
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
    std::vector<acc_t> acc(static_cast<size_t>(C) * K);
    acc_t v[K];
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      const int64_t row_end = std::min(rows, (chunk + 1) * kRowsPerChunk);
      for (int64_t row = chunk * kRowsPerChunk; row < row_end; ++row) {
        const int64_t base = row * C;
        for (int64_t c = 0; c < C; ++c) {
          values(c, base + c, v);
          for (int k = 0; k < K; ++k) acc[k * C + c] += v[k];
        }
      }
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
