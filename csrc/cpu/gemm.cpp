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

// f(block, ahead) for the blocks of tasks [begin, end) in the order one
// thread runs them: each task (task(t): its product and C[m0:m1, n0:n1])
// over its k blocks of kc in order (one with K = 0: the epilogue of zero
// sums), each block with the B of the block after it to fetch meanwhile
// (gemm.h Ahead) — none after the last, or where the next block reads the
// same block of B (still in L2)
template <class Task, class F>
void for_blocks(const Task& task, int64_t kc, int64_t begin, int64_t end, const F& f) {
  if (begin >= end) return;
  auto first = [&](int64_t t) {
    Block b = task(t);
    b.k0 = 0, b.k1 = std::min(b.p->K, kc);
    return b;
  };
  int64_t t = begin;
  Block cur = first(t);
  for (;;) {
    Block next{};
    bool more = true;
    if (cur.k1 < cur.p->K) {
      next = cur;
      next.k0 = cur.k1, next.k1 = std::min(cur.p->K, cur.k1 + kc);
    } else if (t + 1 < end) {
      next = first(++t);
    } else {
      more = false;
    }
    Ahead ahead;
    if (more && !(next.p->b == cur.p->b && next.n0 == cur.n0 && next.k0 == cur.k0))
      ahead = ahead_of(*next.p, next.n0, next.n1, next.k0, next.k1);
    f(cur, ahead);
    if (!more) return;
    cur = next;
  }
}

// run()'s tasks: rows x columns of one product, as plan() cuts them
struct ProductTasks {
  const Problem* p;
  int64_t M, N, mc, nc, n_tasks, count;
  ProductTasks(const Problem* p_, int64_t M_, int64_t N_, const Plan& pl)
      : p(p_), M(M_), N(N_), mc(pl.mc), nc(pl.nc), n_tasks((N_ + pl.nc - 1) / pl.nc),
        count(((M_ + pl.mc - 1) / pl.mc) * n_tasks) {}
  Block operator()(int64_t t) const {
    const int64_t m0 = (t / n_tasks) * mc, n0 = (t % n_tasks) * nc;
    return {p, m0, std::min(M, m0 + mc), n0, std::min(N, n0 + nc), 0, 0};
  }
};

// run_batch()'s tasks: every product whole (its B read by one thread), the
// rows cut only where the products alone are too few to keep every thread
// busy
struct BatchTasks {
  const Problem* problems;
  int64_t M, N, splits, mc, count;
  BatchTasks(const Problem* problems_, int64_t count_, int64_t M_, int64_t N_) : problems(problems_), M(M_), N(N_) {
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    const int64_t tiles = (M + 5) / 6;
    splits = std::min(tiles, (threads * kWant + count_ - 1) / count_);
    mc = ((tiles + splits - 1) / splits) * 6;
    count = count_ * splits;
  }
  Block operator()(int64_t t) const {
    const int64_t m0 = (t % splits) * mc;
    return {&problems[t / splits], m0, std::min(M, m0 + mc), 0, N, 0, 0};
  }
};

// g(tasks, kc): run()'s tasks of problems[0] where count is 0, else
// run_batch()'s of `count` products, with their k block — one place that
// both the runs and schedule() take them from
template <class G>
void with_tasks(const Problem* problems, int64_t count, int64_t M, int64_t N, const G& g) {
  if (count == 0) {
    const Plan pl = plan(M, N, problems[0].K);
    g(ProductTasks(problems, M, N, pl), pl.kc);
  } else {
    g(BatchTasks(problems, count, M, N), k_block(problems[0].K));
  }
}

void run_tasks(const Problem* problems, int64_t count, int64_t M, int64_t N) {
  const Kernel kernel = current();
  with_tasks(problems, count, M, N, [&](const auto& tasks, int64_t kc) {
    at::parallel_for(0, tasks.count, 1, [&](int64_t begin, int64_t end) {
      for_blocks(tasks, kc, begin, end, [&](const Block& b, const Ahead& ahead) {
        kernel.fn(*b.p, b.m0, b.m1, b.n0, b.n1, b.k0, b.k1, ahead.total > 0 ? &ahead : nullptr);
      });
    });
  });
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
  // fewer rows than columns (batch 1's late layers): A is the smaller operand,
  // so the threads share the columns, each reading its own part of B (with
  // the rows cut first, every thread read all of B: resnet50's 2048 -> 512
  // at 7x7, batch 1, 0.80x the time cut by columns; docs/performance.md)
  if (M < N) n_tasks = std::max(n_tasks, std::min(units, threads * kWant));
  int64_t m_tasks = std::min(tiles, (threads * kWant + n_tasks - 1) / n_tasks);
  if (m_tasks * n_tasks < threads * kWant && n_tasks < units)  // few rows: cut the columns further
    n_tasks = std::min(units, (threads * kWant + m_tasks - 1) / m_tasks);
  pl.nc = ((units + n_tasks - 1) / n_tasks) * 64;
  pl.mc = ((tiles + m_tasks - 1) / m_tasks) * 6;
  return pl;
}

void run(const Problem& p, int64_t M, int64_t N) {
  if (M == 0 || N == 0) return;
  run_tasks(&p, 0, M, N);
}

void run_batch(const Problem* problems, int64_t count, int64_t M, int64_t N) {
  if (M == 0 || N == 0 || count == 0) return;
  run_tasks(problems, count, M, N);
}

std::vector<Scheduled> schedule(const Problem* problems, int64_t count, int64_t M, int64_t N, int64_t begin,
                                int64_t end) {
  std::vector<Scheduled> out;
  if (M == 0 || N == 0) return out;
  with_tasks(problems, count, M, N, [&](const auto& tasks, int64_t kc) {
    for_blocks(tasks, kc, std::max<int64_t>(0, begin), end < 0 ? tasks.count : std::min(end, tasks.count),
               [&](const Block& b, const Ahead& ahead) {
                 out.push_back({b.p - problems, b.m0, b.m1, b.n0, b.n1, b.k0, b.k1, ahead});
               });
  });
  return out;
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
