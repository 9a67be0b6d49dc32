// CPU kernels of resnet_fused::grouped_conv3x3_weight and grouped_conv3x3: a
// grouped 3x3 convolution (padding 1, stride 1 or 2, as many output as input
// channels: ResNeXt's middle convolution) on channels_last fp32 activations,
// direct, with the inference epilogue act(conv + bias + residual) applied
// before the one store. A group of cg channels is too narrow for a GEMM
// (cg = 4 to 64 in torchvision's ResNeXts) and oneDNN runs these layers at a
// fraction of its dense rate; here a tile of 6 output pixels x 16 output
// channels keeps its sums in registers over the 9 taps and the group's cg
// input channels (grouped.h), reading each pixel's channels in place.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "checks.h"
#include "gemm_plan.h"
#include "grouped.h"
#include "output_cache.h"

namespace resnet_fused {
namespace cpu {
namespace grouped {

void tile_generic(const Conv& c, const float* const* taps, int64_t rows, int64_t m, int64_t cb) {
  const float* w = c.w + cb * kTaps * c.cg * kBlock;
  for (int64_t j = 0; j < kBlock; ++j) {
    const int64_t o = cb * kBlock + j, in0 = o / c.cg * c.cg;
    for (int64_t r = 0; r < rows; ++r) {
      float acc = 0.0f;
      for (int t = 0; t < kTaps; ++t)
        for (int64_t i = 0; i < c.cg; ++i)
          acc = __builtin_fmaf(taps[t * kRows + r][in0 + i], w[(t * c.cg + i) * kBlock + j], acc);
      float v = acc;
      if (c.bias) v = v + c.bias[o];
      if (c.residual) v = v + c.residual[(m + r) * c.C + o];
      if (c.relu) v = 0.0f > v ? 0.0f : v;  // as vmaxps(0, v): NaN stays NaN, -0 stays -0
      c.y[(m + r) * c.C + o] = v;
    }
  }
}

}  // namespace grouped
}  // namespace cpu

namespace {

using cpu::check_float_cpu;
namespace grouped = cpu::grouped;

// Cache lines [p, p + 64 n) to fetch a share at a time (into L2; `Write`: for
// a store) while other work runs.
template <int Write>
struct Lines {
  const char* p = nullptr;
  int64_t n = 0;
  Lines() = default;
  Lines(const float* begin, const float* end, int64_t most_bytes) {
    p = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(begin) & ~uintptr_t(63));
    n = std::min<int64_t>((reinterpret_cast<const char*>(end) - p + 63) / 64, most_bytes / 64);
  }
  void fetch(int64_t count) {
    for (; count > 0 && n > 0; --count, --n, p += 64) __builtin_prefetch(p, Write, 2);
  }
};

bool groups_supported(int64_t cg) { return cg == 4 || cg == 8 || (cg > 0 && cg % 16 == 0); }

at::Tensor grouped_conv3x3_weight_cpu(const at::Tensor& weight) {
  check_float_cpu("grouped_conv3x3_weight", weight, "weight");
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3,
              "grouped_conv3x3_weight: weight must be (C, C / groups, 3, 3), got ", weight.sizes());
  const int64_t C = weight.size(0), cg = weight.size(1);
  TORCH_CHECK(groups_supported(cg), "grouped_conv3x3_weight: channels per group (weight.size(1)) must be 4, 8 or a "
              "multiple of 16, got ", cg);
  TORCH_CHECK(C % grouped::kBlock == 0 && C % cg == 0, "grouped_conv3x3_weight: output channels must be a multiple "
              "of 16 and of the ", cg, " channels per group, got ", C);
  // (C/16, 16, cg, 3, 3) -> (C/16, 3, 3, cg, 16)
  return weight.reshape({C / grouped::kBlock, grouped::kBlock, cg, 3, 3}).permute({0, 3, 4, 2, 1}).contiguous();
}

at::Tensor grouped_conv3x3_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& residual_opt, bool relu, int64_t stride) {
  const char* op = "grouped_conv3x3";
  check_float_cpu(op, x, "x");
  check_float_cpu(op, weight, "weight");
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(weight.dim() == 5 && weight.size(1) == 3 && weight.size(2) == 3 && weight.size(4) == grouped::kBlock &&
                  weight.is_contiguous(),
              op, ": weight must be a contiguous (C / 16, 3, 3, C / groups, 16) tensor from grouped_conv3x3_weight, got ",
              weight.sizes());
  TORCH_CHECK(stride == 1 || stride == 2, op, ": stride must be 1 or 2, got ", stride);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), cg = weight.size(3);
  TORCH_CHECK(weight.size(0) * grouped::kBlock == C, op, ": weight is for ", weight.size(0) * grouped::kBlock,
              " channels, x has ", C);
  TORCH_CHECK(groups_supported(cg) && C % cg == 0, op, ": weight's channels per group must be 4, 8 or a multiple of "
              "16 dividing C, got ", cg);
  const int64_t P = H == 0 ? 0 : (H - 1) / stride + 1, Q = W == 0 ? 0 : (W - 1) / stride + 1;
  cpu::check_bias(op, bias, C);
  const at::Tensor residual = cpu::channels_last_residual(op, residual_opt, {N, C, P, Q});
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor y = cpu::empty_output({N, C, P, Q}, x.options(), at::MemoryFormat::ChannelsLast);
  const int64_t M = N * P * Q;
  if (M > 0 && C > 0) {
    const grouped::Conv conv{weight.data_ptr<float>(), bias.has_value() && bias->defined() ? bias->data_ptr<float>() : nullptr,
                             residual.defined() ? residual.data_ptr<float>() : nullptr, y.data_ptr<float>(), C, cg, relu};
#if RF_GEMM_X86
    const grouped::TileFn tile = cpu::gemm::isa() == "generic" ? &grouped::tile_generic : &grouped::tile_avx2;
#else
    const grouped::TileFn tile = &grouped::tile_generic;
#endif
    const std::vector<float> zeros(C, 0.0f);
    const float* xp = xc.data_ptr<float>();
    // tasks: ranges of tiles x ranges of column blocks, at least 4 per
    // thread where the shape has them; within a task, chunks of tiles, each
    // chunk's column blocks in turn over all its tiles: a block's weights
    // (9 * cg * 16 floats) stay in L1 over the chunk, and the chunk's input
    // rows (3 * stride rows of C channels per pixel, where a map row is
    // wider than the chunk; the whole input where that is small) in L2
    constexpr int64_t kWant = 4;
    // 256 KB: 192-384 measured alike, a whole batch-8 map 1.2-1.4x slower
    // (resnext50's layer1 and its stride-2 layer2 conv; docs/performance.md)
    constexpr int64_t kInputBytes = 256 << 10;
    const int64_t tiles = (M + grouped::kRows - 1) / grouped::kRows, blocks = C / grouped::kBlock;
    const int64_t per_tile = grouped::kRows * 3 * stride * C * int64_t(sizeof(float));
    const int64_t kChunk = N * H * W * C * int64_t(sizeof(float)) <= kInputBytes
                               ? tiles
                               : std::clamp<int64_t>(kInputBytes / per_tile, 1, 16);
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    const int64_t m_tasks = std::min(tiles, threads * kWant);
    const int64_t c_tasks = std::min(blocks, (threads * kWant + m_tasks - 1) / m_tasks);
    at::parallel_for(0, m_tasks * c_tasks, 1, [&](int64_t begin, int64_t end) {
      std::vector<const float*> taps(kChunk * grouped::kTaps * grouped::kRows);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t mt = task / c_tasks, ct = task % c_tasks;
        const int64_t t0 = tiles * mt / m_tasks, t1 = tiles * (mt + 1) / m_tasks;
        const int64_t b0 = blocks * ct / c_tasks, b1 = blocks * (ct + 1) / c_tasks;
        for (int64_t chunk = t0; chunk < t1; chunk += kChunk) {
          const int64_t count = std::min(kChunk, t1 - chunk);
          for (int64_t k = 0; k < count; ++k)
            for (int64_t i = 0; i < grouped::kRows; ++i) {
              const int64_t m = (chunk + k) * grouped::kRows + i;
              const int64_t q = m % Q, p = m / Q % P, n = m / (P * Q);
              for (int t = 0; t < grouped::kTaps; ++t) {
                const int64_t h = p * stride + t / 3 - 1, w = q * stride + t % 3 - 1;
                const bool inside = m < M && h >= 0 && h < H && w >= 0 && w < W;
                taps[(k * grouped::kTaps + t) * grouped::kRows + i] = inside ? xp + ((n * H + h) * W + w) * C : zeros.data();
              }
            }
          // the next chunk's input rows and output pixels, fetched a share
          // per tile while this chunk runs: each column block reads one
          // line of each pixel (the block's 16 channels), so a chunk's input
          // not yet in cache came in as that many passes of misses, one
          // line per pixel (a batch-8 map is beyond L3: resnext50's layers
          // took 1.3-2.3x as long at batch 8 without this, docs/performance.md)
          Lines<0> in_next;
          Lines<1> out_next;
          const int64_t ma = (chunk + kChunk) * grouped::kRows;
          const int64_t mb = std::min(M, std::min(t1, chunk + 2 * kChunk) * grouped::kRows);
          if (ma < mb) {
            const int64_t na = ma / (P * Q), ha = std::max<int64_t>(0, ma / Q % P * stride - 1);
            const int64_t nb = (mb - 1) / (P * Q), hb = std::min<int64_t>(H, (mb - 1) / Q % P * stride + 2);
            in_next = Lines<0>(xp + (na * H + ha) * W * C, xp + (nb * H + hb) * W * C, kInputBytes * 2);
            // (for a store only where this task writes whole pixels: a line
            // another thread writes would move between the cores)
            if (b1 - b0 == blocks) out_next = Lines<1>(conv.y + ma * C, conv.y + mb * C, kInputBytes);
          }
          const int64_t passes = (b1 - b0) * count;
          const int64_t in_share = (in_next.n + passes - 1) / passes, out_share = (out_next.n + passes - 1) / passes;
          for (int64_t cb = b0; cb < b1; ++cb)
            for (int64_t k = 0; k < count; ++k) {
              const int64_t m = (chunk + k) * grouped::kRows;
              tile(conv, taps.data() + k * grouped::kTaps * grouped::kRows, std::min(grouped::kRows, M - m), m, cb);
              in_next.fetch(in_share);
              out_next.fetch(out_share);
            }
        }
      }
    });
  }
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous() ? y : y.contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("grouped_conv3x3_weight", &grouped_conv3x3_weight_cpu);
  m.impl("grouped_conv3x3", &grouped_conv3x3_cpu);
}

}  // namespace resnet_fused
