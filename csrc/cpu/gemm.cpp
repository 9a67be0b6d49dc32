// The CPU GEMM's driver (gemm.h): which ISA's kernel runs, how a product is
// cut into cache blocks and tasks, and the threads.
#include "gemm_plan.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

namespace resnet_fused {
namespace cpu {
namespace gemm {

namespace {

struct Kernel {
  const char* name;
  BlockFn fn;
};

bool cpu_has(const char* isa) {
#if RF_GEMM_X86
  __builtin_cpu_init();
  if (std::strcmp(isa, "avx512") == 0) return __builtin_cpu_supports("avx512f");
  if (std::strcmp(isa, "avx2") == 0) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return std::strcmp(isa, "generic") == 0;
}

Kernel kernel_for(const std::string& isa) {
#if RF_GEMM_X86
  if (isa == "avx512") return {"avx512", &block_avx512};
  if (isa == "avx2") return {"avx2", &block_avx2};
#endif
  return {"generic", &block_generic};
}

// The best kernel this CPU runs, within ATen's own cap where one is set
// (ATEN_CPU_CAPABILITY=avx2 or default: how an AVX2-only machine is
// emulated on a larger one, and the kernels then follow it).
Kernel best_kernel() {
  const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
  const std::string limit = cap ? cap : "";
  for (const char* isa : {"avx512", "avx2"}) {
    const bool allowed = limit.empty() || limit.rfind("avx512", 0) == 0 || (limit == "avx2" && std::strcmp(isa, "avx2") == 0);
    if (allowed && cpu_has(isa)) return kernel_for(isa);
  }
  return kernel_for("generic");
}

std::atomic<int> g_kernel{-1};  // index into kIsas; -1: not chosen yet
constexpr const char* kIsas[] = {"avx512", "avx2", "generic"};

int index_of(const std::string& isa) {
  for (int i = 0; i < 3; ++i)
    if (isa == kIsas[i]) return i;
  return -1;
}

Kernel current() {
  int i = g_kernel.load(std::memory_order_relaxed);
  if (i < 0) {
    i = index_of(best_kernel().name);
    g_kernel.store(i, std::memory_order_relaxed);
  }
  return kernel_for(kIsas[i]);
}

}  // namespace

std::string isa() { return current().name; }

void set_isa(const std::string& name) {
  const std::string wanted = name.empty() ? best_kernel().name : name;
  const int i = index_of(wanted);
  TORCH_CHECK(i >= 0, "cpu_gemm_isa: isa must be one of 'avx512', 'avx2', 'generic' or '' (the best "
              "this CPU has), got '", name, "'");
  TORCH_CHECK(cpu_has(kIsas[i]), "cpu_gemm_isa: this CPU has no ", wanted, " (with FMA)");
  g_kernel.store(i, std::memory_order_relaxed);
}

namespace {
// tasks per thread, where the rows and columns allow: spreads what a busy
// core or a ragged last task would hold up
constexpr int64_t kWant = 4;

// The block of B a thread runs after C[:, n0:n1]'s last k block: the first
// k block of `next` over columns [nn0, nn1), or none (null `next`)
struct After {
  const Problem* next;
  int64_t nn0, nn1;
};

// C[m0:m1, n0:n1] over every k block, in order (once with K = 0: the
// epilogue of zero sums), each block fetching the next one's B meanwhile
// (gemm.h Ahead): its next k block, else `after`'s — where that is another
// block of B (the same block would still be in L2)
void all_k_blocks(const Kernel& kernel, const Problem& p, int64_t kc, int64_t m0, int64_t m1, int64_t n0,
                  int64_t n1, const After& after) {
  int64_t k0 = 0;
  do {
    const int64_t k1 = std::min(p.K, k0 + kc);
    Ahead ahead;
    if (k1 < p.K)
      ahead = ahead_of(p, n0, n1, k1, std::min(p.K, k1 + kc));
    else if (after.next && (after.next->b != p.b || after.nn0 != n0 || k0 > 0))
      ahead = ahead_of(*after.next, after.nn0, after.nn1, 0, std::min(after.next->K, kc));
    kernel.fn(p, m0, m1, n0, n1, k0, k1, ahead.total > 0 ? &ahead : nullptr);
    k0 = k1;
  } while (k0 < p.K);
}
}  // namespace

int64_t k_block(int64_t K) {
  // whole up to 1024 (the accumulators never leave registers); beyond,
  // equal blocks of at most 512 whose partial sums go through C
  constexpr int64_t kMaxWhole = 1024, kBlock = 512;
  const int64_t kblocks = K <= kMaxWhole ? 1 : (K + kBlock - 1) / kBlock;
  return std::max<int64_t>(1, (K + kblocks - 1) / kblocks);
}

Plan plan(int64_t M, int64_t N, int64_t K) {
  // a task's block of B: 256 KB, within L2 on every x86 core with AVX2
  constexpr int64_t kBBytes = 256 << 10;
  Plan pl;
  pl.kc = k_block(K);
  // columns: a task's block of B (kc x nc) stays in L2 while all its rows
  // pass over it, each tile of rows going over all of it from L1
  const int64_t units = (N + 63) / 64;  // 64 columns: one AVX-512 tile
  const int64_t fit = std::max<int64_t>(1, kBBytes / (pl.kc * 64 * int64_t(sizeof(float))));
  int64_t n_tasks = (units + fit - 1) / fit;
  // rows: split evenly (in tiles of 6) so that every thread gets the same work
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t tiles = std::max<int64_t>(1, (M + 5) / 6);
  int64_t m_tasks = std::min(tiles, (threads * kWant + n_tasks - 1) / n_tasks);
  if (m_tasks * n_tasks < threads * kWant && n_tasks < units)  // few rows: cut the columns further
    n_tasks = std::min(units, (threads * kWant + m_tasks - 1) / m_tasks);
  pl.nc = ((units + n_tasks - 1) / n_tasks) * 64;
  pl.mc = ((tiles + m_tasks - 1) / m_tasks) * 6;
  return pl;
}

void run(const Problem& p, int64_t M, int64_t N) {
  if (M == 0 || N == 0) return;
  const Kernel kernel = current();
  const Plan pl = plan(M, N, p.K);
  const int64_t m_tasks = (M + pl.mc - 1) / pl.mc, n_tasks = (N + pl.nc - 1) / pl.nc;
  at::parallel_for(0, m_tasks * n_tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t m0 = (t / n_tasks) * pl.mc, n0 = (t % n_tasks) * pl.nc;
      const int64_t m1 = std::min(M, m0 + pl.mc), n1 = std::min(N, n0 + pl.nc);
      const int64_t nn0 = ((t + 1) % n_tasks) * pl.nc;  // the thread's next task's columns
      const After after{t + 1 < end ? &p : nullptr, nn0, std::min(N, nn0 + pl.nc)};
      all_k_blocks(kernel, p, pl.kc, m0, m1, n0, n1, after);
    }
  });
}

void run_batch(const Problem* problems, int64_t count, int64_t M, int64_t N) {
  if (M == 0 || N == 0 || count == 0) return;
  const Kernel kernel = current();
  const int64_t kc = k_block(problems[0].K);
  // every product whole (its B read by one thread), the rows cut only where
  // the products alone are too few to keep every thread busy
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t tiles = (M + 5) / 6;
  const int64_t splits = std::min(tiles, (threads * kWant + count - 1) / count);
  const int64_t mc = ((tiles + splits - 1) / splits) * 6;
  at::parallel_for(0, count * splits, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const Problem& p = problems[t / splits];
      const int64_t m0 = (t % splits) * mc, m1 = std::min(M, m0 + mc);
      const After after{t + 1 < end ? &problems[(t + 1) / splits] : nullptr, 0, N};
      all_k_blocks(kernel, p, kc, m0, m1, 0, N, after);
    }
  });
}

void pack(const float* src, int64_t K, int64_t N, int64_t stride_k, int64_t stride_n, float* dst) {
  for (int64_t n0 = 0; n0 < N; n0 += kPanel) {
    const int64_t width = std::min(kPanel, N - n0);
    float* panel = dst + n0 * K;
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < width; ++j) panel[k * width + j] = src[k * stride_k + (n0 + j) * stride_n];
  }
}

}  // namespace gemm
}  // namespace cpu
}  // namespace resnet_fused
