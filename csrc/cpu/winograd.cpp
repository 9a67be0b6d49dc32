// CPU kernels of resnet_fused::winograd_weight and winograd_conv3x3: a 3x3,
// stride-1, padding-1 convolution as Winograd F(4x4, 3x3) (Lavin & Gray,
// "Fast Algorithms for Convolutional Neural Networks", 2016), with the
// inference epilogue act(conv + bias + residual) fused into the output
// transform.
//
// The output is cut into 4x4 tiles; each tile's 6x6 input patch d becomes
// B^T d B (36 values per channel), the filter g becomes G g G^T once (the
// weight transform, computed in double and rounded once), the 36 products
// are 36 independent GEMMs over channels, and A^T m A gives the tile's 4x4
// outputs. That is 36 multiplies per 16 outputs and input channel instead of
// 144: the GEMMs run 2-4x faster than a direct convolution on ResNet's 3x3
// layers, and the transforms are streaming passes over channels_last rows.
//
// Interpolation points 0, 1, -1, 1/2, -2 (and infinity): with 1/2 in place
// of the usual 2, the transforms' largest coefficients shrink and the fp32
// error drops (Barabasz et al., "Error analysis and improving the accuracy
// of Winograd convolution", 2020); measured ‖out - ref‖/‖ref‖ against an
// fp64 convolution: 0.8-1.4e-6 on ResNet's layers (direct oneDNN: 3-8e-7).
//
// Layout: x is read as channels_last rows of C channels, so every transform
// is a loop over channels in blocks of 16 lanes (GCC vector extensions,
// compiled for each target clone; C and K must be multiples of 16). The
// transformed input U[36][T][C] and the products M[36][T][K] live in a
// per-thread workspace of bounded size: tiles go through in chunks, each
// chunk transformed, multiplied (the 36 products by the library's GEMM,
// gemm.h, on the filters packed for it by winograd_weight, each product on
// one thread) and written out before the next. Chunks and the work of each
// tile depend on the shape alone, and each GEMM output is one multiply-add
// chain in a fixed order, so the result does not depend on the thread count
// or the CPU's instruction set.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "clones.h"
#include "checks.h"
#include "gemm_plan.h"
#include "output_cache.h"

// The helpers below pass 64-byte vectors by value; they are always inlined
// into the target clones, so no call crosses an ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace resnet_fused {
namespace {

constexpr int64_t kTile = 4;       // outputs per tile side
constexpr int64_t kPatch = 6;      // inputs per tile side: kTile + 3 - 1
constexpr int64_t kPoints = 36;    // kPatch * kPatch
constexpr int64_t kLanes = 16;     // channels per vector
// Per-chunk workspace budget, each of U and M: a chunk's working set stays
// within the caches between the transforms and the products (1-2 MB measured
// fastest, 8 MB 10-20% slower on ResNet's layers at batch 8), and a thread's
// workspace is bounded whatever the batch (by this, or by kMinChunkTiles
// tiles where those take more).
constexpr int64_t kChunkBytes = int64_t(2) << 20;
// ...but up to this many tiles a chunk may take more, and the chunks are
// cut evenly (each more than half the largest allowed): every chunk reads
// all 36 filters (36·C·K floats, 36 MB at 512 channels, more than L3), so a
// chunk of few tiles pays that read for little work (layer4 of ResNet-50 at
// batch 8, 32 tiles: chunks of 28 + 4 took 1.25-1.3x the time of one chunk
// of 32; docs/performance.md).
constexpr int64_t kMinChunkTiles = 64;

typedef float lanes __attribute__((vector_size(kLanes * sizeof(float)), aligned(alignof(float))));

__attribute__((always_inline)) inline lanes load(const float* p) {
  lanes v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
__attribute__((always_inline)) inline void store(float* p, lanes v) { std::memcpy(p, &v, sizeof(v)); }

// r = B^T d for one column (or row) of six values
__attribute__((always_inline)) inline void input_transform(const lanes* d, lanes* r) {
  r[0] = d[0] - 1.5f * d[1] - 2.f * d[2] + 1.5f * d[3] + d[4];
  r[1] = -d[1] + 0.5f * d[2] + 2.5f * d[3] + d[4];
  r[2] = d[1] - 2.5f * d[2] + 0.5f * d[3] + d[4];
  r[3] = -2.f * d[1] - d[2] + 2.f * d[3] + d[4];
  r[4] = 0.5f * d[1] - d[2] - 0.5f * d[3] + d[4];
  r[5] = d[1] - 1.5f * d[2] - 2.f * d[3] + 1.5f * d[4] + d[5];
}

// o = A^T m for six values, four out
__attribute__((always_inline)) inline void output_transform(const lanes* m, lanes* o) {
  o[0] = m[0] + m[1] + m[2] + m[3] + m[4];
  o[1] = m[1] - m[2] + 0.5f * m[3] - 2.f * m[4];
  o[2] = m[1] + m[2] + 0.25f * m[3] + 4.f * m[4];
  o[3] = m[1] - m[2] + 0.125f * m[3] - 8.f * m[4] + m[5];
}

// G for the filter transform, in double
constexpr double kG[kPatch][3] = {
    {1.0, 0.0, 0.0},
    {1.0 / 3, 1.0 / 3, 1.0 / 3},
    {-1.0 / 3, 1.0 / 3, -1.0 / 3},
    {-16.0 / 15, -8.0 / 15, -4.0 / 15},
    {1.0 / 15, -2.0 / 15, 4.0 / 15},
    {0.0, 0.0, 1.0},
};

struct Geometry {
  int64_t N, H, W, C, K, TH, TW;  // TH x TW tiles per image
  int64_t tile_n(int64_t t) const { return t / (TH * TW); }
  int64_t tile_y(int64_t t) const { return (t / TW) % TH; }
  int64_t tile_x(int64_t t) const { return t % TW; }
};

// U[p][t - t0][:] for tiles [t0, t1); `zeros` stands in for the padding.
// Each tile's patch is first copied row by row into `patch` (kPoints * C
// floats): the transform reads one 16-channel line of each of its 36 pixels
// per step, and read from the map in that order a patch not in cache came
// in as one pass of misses per channel block (batch 8: 0.75-0.9x the
// transform's time copied; docs/performance.md).
RF_CPU_CLONES void transform_inputs(const float* x, const float* zeros, const Geometry& g, int64_t t0,
                                    int64_t t1, int64_t begin, int64_t end, float* patch, float* U) {
  const int64_t rows = t1 - t0;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t n = g.tile_n(t), h0 = g.tile_y(t) * kTile - 1, w0 = g.tile_x(t) * kTile - 1;
    const int64_t w_lo = std::max<int64_t>(0, w0), w_hi = std::min<int64_t>(g.W, w0 + kPatch);
    const float* pixel[kPatch][kPatch];
    for (int64_t i = 0; i < kPatch; ++i) {
      const int64_t h = h0 + i;
      const bool row_inside = h >= 0 && h < g.H && w_lo < w_hi;
      float* row = patch + i * kPatch * g.C;
      if (row_inside)
        std::memcpy(row + (w_lo - w0) * g.C, x + ((n * g.H + h) * g.W + w_lo) * g.C,
                    static_cast<size_t>((w_hi - w_lo) * g.C) * sizeof(float));
      for (int64_t j = 0; j < kPatch; ++j)
        pixel[i][j] = row_inside && w0 + j >= w_lo && w0 + j < w_hi ? row + j * g.C : zeros;
    }
    float* u = U + (t - t0) * g.C;
    for (int64_t c = 0; c < g.C; c += kLanes) {
      lanes cols[kPatch][kPatch];  // cols[i][j] = (B^T d)[i][j]
      for (int64_t j = 0; j < kPatch; ++j) {
        lanes d[kPatch], r[kPatch];
        for (int64_t i = 0; i < kPatch; ++i) d[i] = load(pixel[i][j] + c);
        input_transform(d, r);
        for (int64_t i = 0; i < kPatch; ++i) cols[i][j] = r[i];
      }
      for (int64_t i = 0; i < kPatch; ++i) {
        lanes r[kPatch];
        input_transform(cols[i], r);
        for (int64_t j = 0; j < kPatch; ++j) store(u + ((i * kPatch + j) * rows) * g.C + c, r[j]);
      }
    }
  }
}

// y = act(A^T m A + bias + residual) for tiles [t0, t1), cut at the borders.
// A tile's A^T m A + bias goes to `tile` (kTile * kTile * K floats) one
// channel block at a time, then the residual and ReLU pixel by pixel: read
// and written channel block by channel block, the 16 pixels' lines of y and
// of the residual came in as one pass of misses per block (batch 8: 0.4-0.6x
// the transform's time this way; docs/performance.md).
RF_CPU_CLONES void transform_outputs(const float* M, const float* bias, const float* residual, bool relu,
                                     const Geometry& g, int64_t t0, int64_t t1, int64_t begin, int64_t end,
                                     float* tile, float* y) {
  const int64_t rows = t1 - t0;
  const lanes zero = {};
  for (int64_t t = begin; t < end; ++t) {
    const int64_t n = g.tile_n(t), h0 = g.tile_y(t) * kTile, w0 = g.tile_x(t) * kTile;
    const int64_t hn = std::min(kTile, g.H - h0), wn = std::min(kTile, g.W - w0);
    const float* m = M + (t - t0) * g.K;
    for (int64_t k = 0; k < g.K; k += kLanes) {
      lanes half[kTile][kPatch];  // (A^T m)[i][j]
      for (int64_t j = 0; j < kPatch; ++j) {
        lanes col[kPatch], o[kTile];
        for (int64_t i = 0; i < kPatch; ++i) col[i] = load(m + ((i * kPatch + j) * rows) * g.K + k);
        output_transform(col, o);
        for (int64_t i = 0; i < kTile; ++i) half[i][j] = o[i];
      }
      const lanes b = load(bias + k);
      for (int64_t i = 0; i < hn; ++i) {
        lanes o[kTile];
        output_transform(half[i], o);
        for (int64_t j = 0; j < wn; ++j) store(tile + (i * kTile + j) * g.K + k, o[j] + b);
      }
    }
    for (int64_t i = 0; i < hn; ++i)
      for (int64_t j = 0; j < wn; ++j) {
        const float* v_in = tile + (i * kTile + j) * g.K;
        const int64_t at = ((n * g.H + h0 + i) * g.W + w0 + j) * g.K;
        for (int64_t k = 0; k < g.K; k += kLanes) {
          lanes v = load(v_in + k);
          if (residual) v += load(residual + at + k);
          if (relu) v = v < zero ? zero : v;  // NaN stays NaN, as in torch.relu (relu_keep_nan)
          store(y + at + k, v);
        }
      }
  }
}

using cpu::check_float_cpu;

at::Tensor winograd_weight_cpu(const at::Tensor& weight) {
  cpu::check_gemm_weight("winograd_weight", weight, 3, 3, cpu::gemm::kColumns);
  const int64_t K = weight.size(0), C = weight.size(1);
  const at::Tensor w = weight.to(at::kDouble).contiguous();
  at::Tensor v = at::empty({kPoints, C, K}, weight.options().dtype(at::kDouble));
  const double* src = w.data_ptr<double>();
  double* dst = v.data_ptr<double>();
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k)
      for (int64_t c = 0; c < C; ++c) {
        const double* f = src + (k * C + c) * 9;
        double half[kPatch][3];  // G f
        for (int64_t i = 0; i < kPatch; ++i)
          for (int64_t b = 0; b < 3; ++b) half[i][b] = kG[i][0] * f[b] + kG[i][1] * f[3 + b] + kG[i][2] * f[6 + b];
        for (int64_t i = 0; i < kPatch; ++i)
          for (int64_t j = 0; j < kPatch; ++j)
            dst[((i * kPatch + j) * C + c) * K + k] = half[i][0] * kG[j][0] + half[i][1] * kG[j][1] + half[i][2] * kG[j][2];
      }
  });
  // each point's (C x K) matrix rounded once, then packed for the GEMM
  const at::Tensor rounded = v.to(at::kFloat);
  at::Tensor packed = at::empty({kPoints, C * K}, weight.options());
  at::parallel_for(0, kPoints, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      cpu::gemm::pack(rounded.data_ptr<float>() + p * C * K, C, K, K, 1, packed.data_ptr<float>() + p * C * K);
  });
  return packed;
}

at::Tensor winograd_conv3x3_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                const std::optional<at::Tensor>& residual_opt, bool relu) {
  check_float_cpu("winograd_conv3x3", x, "x");
  check_float_cpu("winograd_conv3x3", weight, "weight");
  check_float_cpu("winograd_conv3x3", bias, "bias");
  TORCH_CHECK(x.dim() == 4, "winograd_conv3x3: x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == kPoints && weight.is_contiguous(),
              "winograd_conv3x3: weight must be a contiguous (36, C * K) tensor from winograd_weight, got ",
              weight.sizes());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(C > 0 && weight.size(1) % C == 0, "winograd_conv3x3: x has ", C, " channels but weight (",
              weight.size(1), " values per point) does not hold a multiple of them");
  const int64_t K = weight.size(1) / C;
  TORCH_CHECK(C % kLanes == 0 && K % kLanes == 0, "winograd_conv3x3: input and output channels must be multiples of ",
              kLanes, ", got C=", C, ", K=", K);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == K && bias.is_contiguous(),
              "winograd_conv3x3: bias must be a contiguous (", K, ",) tensor, got ", bias.sizes());
  const at::Tensor residual = cpu::channels_last_residual("winograd_conv3x3", residual_opt, {N, K, H, W});
  const bool channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor y = cpu::empty_output({N, K, H, W}, x.options(), at::MemoryFormat::ChannelsLast);
  if (y.numel() == 0) return channels_last ? y : y.contiguous();

  const Geometry g{N, H, W, C, K, (H + kTile - 1) / kTile, (W + kTile - 1) / kTile};
  const int64_t tiles = N * g.TH * g.TW;
  const int64_t per_tile = kPoints * std::max(C, K) * int64_t(sizeof(float));
  const int64_t most = std::max(kMinChunkTiles, kChunkBytes / per_tile);
  const int64_t n_chunks = (tiles + most - 1) / most;
  const int64_t chunk = (tiles + n_chunks - 1) / n_chunks;
  // the calling thread's workspace, grown to the largest chunk it has run
  thread_local std::vector<float> u_space, m_space;
  const size_t u_size = static_cast<size_t>(kPoints * std::min(chunk, tiles) * C);
  const size_t m_size = static_cast<size_t>(kPoints * std::min(chunk, tiles) * K);
  if (u_space.size() < u_size) u_space.resize(u_size);
  if (m_space.size() < m_size) m_space.resize(m_size);
  const std::vector<float> zeros(static_cast<size_t>(C), 0.f);

  const float* xp = xc.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* rp = residual.defined() ? residual.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  for (int64_t t0 = 0; t0 < tiles; t0 += chunk) {
    const int64_t t1 = std::min(tiles, t0 + chunk), rows = t1 - t0;
    float* U = u_space.data();
    float* M = m_space.data();
    at::parallel_for(t0, t1, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> patch(static_cast<size_t>(kPoints * C));
      transform_inputs(xp, zeros.data(), g, t0, t1, begin, end, patch.data(), U);
    });
    cpu::gemm::Problem products[kPoints];
    for (int64_t p = 0; p < kPoints; ++p)
      products[p] = cpu::gemm::product(cpu::gemm::Rows::matrix(U + p * rows * C, C), C, wp + p * C * K, K,
                                       M + p * rows * K, K);
    cpu::gemm::run_batch(products, kPoints, rows, K);
    at::parallel_for(t0, t1, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> tile(static_cast<size_t>(kTile * kTile * K));
      transform_outputs(M, bp, rp, relu, g, t0, t1, begin, end, tile.data(), yp);
    });
  }
  return channels_last ? y : y.contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("winograd_weight", &winograd_weight_cpu);
  m.impl("winograd_conv3x3", &winograd_conv3x3_cpu);
}

}  // namespace resnet_fused
