// gemm.cpp's interface to the ops that use the CPU GEMM (conv1x1.cpp,
// winograd.cpp): run a Problem over threads, and the ISA in force.
#pragma once

#include <string>
#include <vector>

#include "gemm.h"

namespace resnet_fused {
namespace cpu {
namespace gemm {

// How run() cuts an M x N x K product: k blocks of kc, tasks of mc rows x nc
// columns (nc a multiple of 64, or N).
struct Plan {
  int64_t kc, mc, nc;
};
Plan plan(int64_t M, int64_t N, int64_t K);
// The k block of a product over K (Plan::kc): less than K where partial sums
// go through the output.
int64_t k_block(int64_t K);

// The whole product, on at::parallel_for's threads. N must be a multiple of
// kColumns. With K = 0 the output is the epilogue of zero sums.
void run(const Problem& p, int64_t M, int64_t N);

// `count` products of the same M x N x K, on at::parallel_for's threads:
// each task one product's rows [m0, m1) (the Winograd F(4x4, 3x3)'s 36).
void run_batch(const Problem* problems, int64_t count, int64_t M, int64_t N);

// The blocks that tasks [begin, end) (end < 0: to the last) of one thread
// run, in order, with the lines each fetches ahead (gemm.h Ahead): of run()
// on problems[0] where count is 0, else of run_batch() on `count` products —
// for tests (the split of tasks over threads is at::parallel_for's).
struct Scheduled {
  int64_t product, m0, m1, n0, n1, k0, k1;
  Ahead ahead;
};
std::vector<Scheduled> schedule(const Problem* problems, int64_t count, int64_t M, int64_t N, int64_t begin,
                                int64_t end);

// B (K x N, element (k, n) at src[k * stride_k + n * stride_n]) into the
// packed panels of gemm.h (K * N floats at dst). N a multiple of kColumns.
void pack(const float* src, int64_t K, int64_t N, int64_t stride_k, int64_t stride_n, float* dst);

// The kernel in use ("avx512", "avx2" or "generic"), and a way to pick
// another that this CPU runs ("" picks the best again) — for tests and
// measurements; every kernel gives the same bits.
std::string isa();
void set_isa(const std::string& name);

}  // namespace gemm
}  // namespace cpu
}  // namespace resnet_fused
