// CUDA kernels of train-mode BatchNorm + residual + ReLU (batch_norm_act_fwd/bwd).
//
// Per-channel reductions run in two stages without atomics: blocks write
// partial results per (split, channel), then one thread per channel merges
// them in a fixed order. The result is deterministic, and large N*H*W is
// spread over many blocks instead of serialising on atomics.
//   forward:  partial Welford stats -> finalize (mean, var, invstd, γ·invstd)
//             -> fused centre/normalise + residual + ReLU pass
//   backward: partial (Σdz, Σdz·x̂) -> finalize (dγ, dβ, constants) -> dx pass
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../batch_norm_act_args.h"
#include "common.cuh"

namespace resnet_fused {
namespace {

constexpr int kPlaneThreads = 256;  // NCHW reduction: threads per block
constexpr int kTileC = 32;          // channels_last reduction: channels per block
constexpr int kTileRows = 8;        // channels_last reduction: rows per block step

template <typename scalar_t, typename acc_t>
struct StatsReducer {
  using State = Welford<acc_t>;
  const scalar_t* x;
  static __device__ State zero() { return State{acc_t(0), acc_t(0), acc_t(0)}; }
  __device__ void add(State& s, int64_t, int64_t i) const { s.add(static_cast<acc_t>(x[i])); }
};

template <typename acc_t>
struct GradSums {
  acc_t dz;
  acc_t dz_xhat;
  __device__ void merge(const GradSums& o) {
    dz += o.dz;
    dz_xhat += o.dz_xhat;
  }
};

template <typename scalar_t, typename acc_t>
struct GradReducer {
  using State = GradSums<acc_t>;
  const scalar_t* grad_out;
  const scalar_t* out;
  const scalar_t* x;
  const acc_t* mean;
  const acc_t* invstd;
  bool relu;
  static __device__ State zero() { return State{acc_t(0), acc_t(0)}; }
  __device__ void add(State& s, int64_t c, int64_t i) const {
    const acc_t dz = relu_backward<acc_t>(static_cast<acc_t>(grad_out[i]),
                                          static_cast<acc_t>(out[i]), relu);
    const acc_t xhat = (static_cast<acc_t>(x[i]) - mean[c]) * invstd[c];
    s.dz += dz;
    s.dz_xhat += dz * xhat;
  }
};

// NCHW: block (c, split) reduces the planes n = split, split + splits, ...
template <typename Reducer>
__global__ void reduce_nchw_kernel(Reducer red, typename Reducer::State* partial, int64_t N,
                                   int64_t C, int64_t HW) {
  using State = typename Reducer::State;
  const int64_t c = blockIdx.x;
  State s = Reducer::zero();
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const int64_t base = (n * C + c) * HW;
    for (int64_t j = threadIdx.x; j < HW; j += blockDim.x) red.add(s, c, base + j);
  }
  __shared__ State shm[kPlaneThreads];
  shm[threadIdx.x] = s;
  __syncthreads();
  for (int stride = kPlaneThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) shm[threadIdx.x].merge(shm[threadIdx.x + stride]);
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.y * C + c] = shm[0];
}

// channels_last: a warp reads 32 consecutive channels of one row (coalesced);
// block (channel tile, split) walks rows split*8 + ty, stepping splits*8.
template <typename Reducer>
__global__ void reduce_nhwc_kernel(Reducer red, typename Reducer::State* partial, int64_t rows,
                                   int64_t C) {
  using State = typename Reducer::State;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kTileC + threadIdx.x;
  State s = Reducer::zero();
  if (c < C) {
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * kTileRows + threadIdx.y; r < rows;
         r += static_cast<int64_t>(gridDim.y) * kTileRows) {
      red.add(s, c, r * C + c);
    }
  }
  __shared__ State shm[kTileRows][kTileC];
  shm[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    State t = shm[0][threadIdx.x];
    for (int k = 1; k < kTileRows; ++k) t.merge(shm[k][threadIdx.x]);
    partial[blockIdx.y * C + c] = t;
  }
}

// Launches the layout's reduction; returns the number of splits written to
// partial (allocated here, [splits, C]).
template <typename Reducer>
int64_t reduce_channels(const Reducer& red, at::Tensor& partial_buf, bool channels_last,
                        int64_t N, int64_t C, int64_t HW, const at::TensorOptions& opts,
                        cudaStream_t stream) {
  using State = typename Reducer::State;
  const int64_t target_blocks = static_cast<int64_t>(cuda::sm_count()) * 4;
  const int64_t state_bytes = sizeof(State);
  if (!channels_last) {
    const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(N, (target_blocks + C - 1) / C));
    partial_buf = at::empty({splits * C * state_bytes}, opts.dtype(at::kByte));
    auto* partial = reinterpret_cast<State*>(partial_buf.data_ptr());
    reduce_nchw_kernel<Reducer><<<dim3(C, splits), kPlaneThreads, 0, stream>>>(red, partial, N, C, HW);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return splits;
  }
  const int64_t rows = N * HW;
  const int64_t tiles = (C + kTileC - 1) / kTileC;
  const int64_t max_splits = std::max<int64_t>(1, (rows + kTileRows - 1) / kTileRows);
  const int64_t splits =
      std::max<int64_t>(1, std::min<int64_t>({max_splits, (target_blocks + tiles - 1) / tiles, 65535}));
  partial_buf = at::empty({splits * C * state_bytes}, opts.dtype(at::kByte));
  auto* partial = reinterpret_cast<State*>(partial_buf.data_ptr());
  reduce_nhwc_kernel<Reducer><<<dim3(tiles, splits), dim3(kTileC, kTileRows), 0, stream>>>(
      red, partial, rows, C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return splits;
}

template <typename acc_t>
__global__ void finalize_stats_kernel(const Welford<acc_t>* partial, int64_t splits, int64_t C,
                                      acc_t eps, const acc_t* weight, acc_t* mean,
                                      acc_t* var, acc_t* invstd, acc_t* scale) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  Welford<acc_t> s = partial[c];
  for (int64_t k = 1; k < splits; ++k) s.merge(partial[k * C + c]);
  const acc_t v = s.m2 / s.count;
  mean[c] = s.mean;
  var[c] = v;
  const acc_t is = acc_t(1) / sqrt(v + eps);
  invstd[c] = is;
  scale[c] = weight[c] * is;
}

template <typename acc_t>
__global__ void finalize_grad_kernel(const GradSums<acc_t>* partial, int64_t splits, int64_t C,
                                     acc_t count, const acc_t* weight, const acc_t* invstd,
                                     acc_t* grad_w, acc_t* grad_b, acc_t* consts) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  GradSums<acc_t> s = partial[c];
  for (int64_t k = 1; k < splits; ++k) s.merge(partial[k * C + c]);
  grad_b[c] = s.dz;
  grad_w[c] = s.dz_xhat;
  consts[3 * c] = s.dz / count;
  consts[3 * c + 1] = s.dz_xhat / count;
  consts[3 * c + 2] = weight[c] * invstd[c];
}

template <typename scalar_t, typename acc_t, bool CHANNELS_LAST>
__global__ void bn_act_backward_kernel(const scalar_t* __restrict__ grad_out,
                                       const scalar_t* __restrict__ out,
                                       const scalar_t* __restrict__ x,
                                       const acc_t* __restrict__ mean,
                                       const acc_t* __restrict__ invstd,
                                       const acc_t* __restrict__ consts, scalar_t* grad_x,
                                       scalar_t* grad_res, int64_t numel, int64_t C, int64_t HW,
                                       bool relu) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    const int64_t c = CHANNELS_LAST ? i % C : (i / HW) % C;
    const acc_t dz = relu_backward<acc_t>(static_cast<acc_t>(grad_out[i]),
                                          static_cast<acc_t>(out[i]), relu);
    const acc_t xhat = (static_cast<acc_t>(x[i]) - mean[c]) * invstd[c];
    grad_x[i] = static_cast<scalar_t>(
        bn_backward_dx<acc_t>(dz, xhat, consts[3 * c], consts[3 * c + 1], consts[3 * c + 2]));
    if (grad_res) grad_res[i] = static_cast<scalar_t>(dz);
  }
}

int64_t blocks_for(int64_t n, int threads) {
  return std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads,
                                                static_cast<int64_t>(cuda::sm_count()) * 32));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_fwd_cuda(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps, const c10::optional<at::Tensor>& residual,
    bool relu, int64_t residual_channel_offset) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  // a narrower/strided residual is padded to a dense tensor here (the
  // vectorised epilogue reads residuals in x's layout)
  const BatchNormActForward a = prepare_batch_norm_act_forward(
      x_in, weight, bias, eps, residual, residual_channel_offset, /*read_in_place=*/false);
  if (a.x.numel() == 0) return {a.out, a.mean, a.invstd, a.var};
  const bool cl = a.channels_last;
  const int64_t N = a.N, C = a.C, HW = a.HW;
  const at::Tensor &x = a.x, &w = a.weight, &b = a.bias, &res = a.residual;
  const at::Tensor &out = a.out, &mean = a.mean, &var = a.var, &invstd = a.invstd;
  const auto acc_opts = mean.options();
  at::Tensor scale = at::empty({C}, acc_opts);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_act_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    at::Tensor partial;
    const int64_t splits = reduce_channels(StatsReducer<scalar_t, acc_t>{xp}, partial, cl, N, C, HW,
                                           x.options(), stream);
    finalize_stats_kernel<acc_t><<<(C + 127) / 128, 128, 0, stream>>>(
        reinterpret_cast<const Welford<acc_t>*>(partial.const_data_ptr()), splits, C,
        static_cast<acc_t>(eps), w.const_data_ptr<acc_t>(), mean.data_ptr<acc_t>(),
        var.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), scale.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cuda::launch_epilogue<scalar_t, acc_t>(
        xp, out.data_ptr<scalar_t>(), res.defined() ? res.const_data_ptr<scalar_t>() : nullptr,
        mean.const_data_ptr<acc_t>(), scale.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), cl,
        x.numel(), C, HW, relu, stream);
  });
  return {a.out, a.mean, a.invstd, a.var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& out_in,
    const c10::optional<at::Tensor>& weight, const at::Tensor& mean_in,
    const at::Tensor& invstd_in, bool relu, bool residual_grad, int64_t residual_channels,
    int64_t residual_channel_offset) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const BatchNormActBackward a = prepare_batch_norm_act_backward(
      grad_out_in, x_in, out_in, weight, mean_in, invstd_in, residual_grad, residual_channels,
      residual_channel_offset);
  if (a.x.numel() == 0) return {a.grad_x, a.grad_weight, a.grad_bias, a.grad_residual};
  const bool cl = a.channels_last;
  const int64_t N = a.N, C = a.C, HW = a.HW;
  const at::Tensor &x = a.x, &g = a.grad_out, &o = a.out, &w = a.weight, &mean = a.mean,
                   &invstd = a.invstd;
  const at::Tensor &grad_x = a.grad_x, &grad_w = a.grad_weight, &grad_b = a.grad_bias;
  // the kernel writes dz for every channel: a narrower residual's gradient
  // is copied out of a full-size buffer afterwards
  const bool narrow = residual_grad && a.residual_channels != C;
  const at::Tensor grad_res = narrow ? at::empty_like(grad_x) : a.grad_residual;
  const auto acc_opts = mean.options();
  at::Tensor consts = at::empty({3 * C}, acc_opts);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_act_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const GradReducer<scalar_t, acc_t> red{g.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(),
                                           x.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(),
                                           invstd.const_data_ptr<acc_t>(), relu};
    at::Tensor partial;
    const int64_t splits = reduce_channels(red, partial, cl, N, C, HW, x.options(), stream);
    finalize_grad_kernel<acc_t><<<(C + 127) / 128, 128, 0, stream>>>(
        reinterpret_cast<const GradSums<acc_t>*>(partial.const_data_ptr()), splits, C,
        static_cast<acc_t>(N * HW), w.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
        grad_w.data_ptr<acc_t>(), grad_b.data_ptr<acc_t>(), consts.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    constexpr int kThreads = 256;
    const int64_t blocks = blocks_for(x.numel(), kThreads);
    scalar_t* grp = residual_grad ? grad_res.data_ptr<scalar_t>() : nullptr;
    if (cl) {
      bn_act_backward_kernel<scalar_t, acc_t, true><<<blocks, kThreads, 0, stream>>>(
          red.grad_out, red.out, red.x, red.mean, red.invstd, consts.const_data_ptr<acc_t>(),
          grad_x.data_ptr<scalar_t>(), grp, x.numel(), C, HW, relu);
    } else {
      bn_act_backward_kernel<scalar_t, acc_t, false><<<blocks, kThreads, 0, stream>>>(
          red.grad_out, red.out, red.x, red.mean, red.invstd, consts.const_data_ptr<acc_t>(),
          grad_x.data_ptr<scalar_t>(), grp, x.numel(), C, HW, relu);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (narrow) a.grad_residual.copy_(grad_res.narrow(1, a.residual_offset, a.residual_channels));
  return {a.grad_x, a.grad_weight, a.grad_bias, a.grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("batch_norm_act_fwd", &batch_norm_act_fwd_cuda);
  m.impl("batch_norm_act_bwd", &batch_norm_act_bwd_cuda);
}

}  // namespace resnet_fused
