// CUDA kernels of train-mode BatchNorm + residual + ReLU (batch_norm_act_fwd/bwd).
//
// Per-channel reductions run in two stages without atomics: blocks write
// partial results per (split, channel), then one thread per channel merges
// them in a fixed order. The result is deterministic, and large N*H*W is
// spread over many blocks instead of serialising on atomics. Partition and
// per-thread arithmetic: csrc/bn_reduce.h (also run on the host by the CPU
// tests). Every pass moves 16 bytes per access where the pointers and
// shape allow.
//   forward:  partial Welford stats -> finalize (mean, var, invstd, γ·invstd)
//             -> fused centre/normalise + residual + ReLU pass
//   backward: partial (Σdz, Σdz·x̂) -> finalize (dγ, dβ, constants) -> dx pass
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../batch_norm_act_args.h"
#include "../bn_reduce.h"
#include "common.cuh"

namespace resnet_fused {
namespace {

using bn_reduce::kThreads;

// NCHW: block (c, split) reduces channel c's work items of its split.
template <class Red, int VEC, typename index_t>
__global__ void __launch_bounds__(kThreads)
    reduce_nchw_kernel(Red red, typename Red::State* partial, index_t C, index_t HW, index_t work,
                       index_t chunk) {
  using State = typename Red::State;
  const index_t c = blockIdx.x;
  const index_t begin = static_cast<index_t>(blockIdx.y) * chunk;
  const index_t end = begin + chunk < work ? begin + chunk : work;
  __shared__ State shm[kThreads];
  shm[threadIdx.x] = bn_reduce::nchw_thread<Red, VEC, index_t>(red, c, C, HW, begin, end, threadIdx.x);
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    bn_reduce::tree_level(shm, threadIdx.x, stride, 1);
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.y * C + c] = shm[0];
}

// channels_last: thread (tx, ty) of block (tile, split) owns channels
// c0 .. c0 + VEC, c0 = (tile·TX + tx)·VEC, and rows begin + ty, + TY, ...
template <class Red, int VEC, typename index_t>
__global__ void __launch_bounds__(kThreads)
    reduce_nhwc_kernel(Red red, typename Red::State* partial, index_t C, index_t rows, index_t chunk) {
  using State = typename Red::State;
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const index_t c0 = (static_cast<index_t>(blockIdx.x) * TX + tx) * VEC;
  const bool active = c0 < C;
  const index_t begin = static_cast<index_t>(blockIdx.y) * chunk;
  const index_t end = begin + chunk < rows ? begin + chunk : rows;
  __shared__ State shm[kThreads * VEC];
  State* mine = shm + (ty * TX + tx) * VEC;
  if (active) {
    const auto s = bn_reduce::nhwc_thread<Red, VEC, index_t>(red, c0, C, begin, end, ty, TY);
RF_UNROLL
    for (int k = 0; k < VEC; ++k) mine[k] = Red::template lane<VEC>(s, k);
  } else {
RF_UNROLL
    for (int k = 0; k < VEC; ++k) mine[k] = Red::zero();
  }
  __syncthreads();
  for (int stride = TY / 2; stride > 0; stride >>= 1) {
RF_UNROLL
    for (int k = 0; k < VEC; ++k) bn_reduce::tree_level(shm + tx * VEC + k, ty, stride, TX * VEC);
    __syncthreads();
  }
  if (ty == 0 && active) {
RF_UNROLL
    for (int k = 0; k < VEC; ++k) partial[blockIdx.y * C + c0 + k] = mine[k];
  }
}

template <class Red, int VEC, typename index_t>
void launch_reduce(const Red& red, const bn_reduce::Plan& p, typename Red::State* partial, int64_t C,
                   int64_t HW, cudaStream_t stream) {
  if (!p.channels_last) {
    reduce_nchw_kernel<Red, VEC, index_t><<<dim3(p.tiles, p.splits), kThreads, 0, stream>>>(
        red, partial, C, HW, p.work, p.chunk);
  } else {
    reduce_nhwc_kernel<Red, VEC, index_t><<<dim3(p.tiles, p.splits), dim3(p.tx, p.ty), 0, stream>>>(
        red, partial, C, p.work, p.chunk);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Launches the reduction csrc/bn_reduce.h plans; returns the number of
// splits written to partial (allocated here, [splits, C] states).
template <typename scalar_t, class Red>
int64_t reduce_channels(const Red& red, std::initializer_list<const void*> inputs, at::Tensor& partial_buf,
                        bool channels_last, int64_t N, int64_t C, int64_t HW, const at::TensorOptions& opts,
                        cudaStream_t stream) {
  using State = typename Red::State;
  bool aligned = true;
  for (const void* q : inputs) aligned = aligned && cuda::aligned16(q);
  const bn_reduce::Plan p =
      bn_reduce::make_plan(channels_last, N, C, HW, sizeof(scalar_t), aligned, cuda::sm_count());
  partial_buf = at::empty({p.splits * C * static_cast<int64_t>(sizeof(State))}, opts.dtype(at::kByte));
  auto* partial = reinterpret_cast<State*>(partial_buf.data_ptr());
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (p.vec == kVec) {
    if (p.wide_index) launch_reduce<Red, kVec, int64_t>(red, p, partial, C, HW, stream);
    else launch_reduce<Red, kVec, int32_t>(red, p, partial, C, HW, stream);
  } else {
    if (p.wide_index) launch_reduce<Red, 1, int64_t>(red, p, partial, C, HW, stream);
    else launch_reduce<Red, 1, int32_t>(red, p, partial, C, HW, stream);
  }
  return p.splits;
}

template <typename acc_t>
__device__ Welford<acc_t> shfl_down(const Welford<acc_t>& s, int by) {
  return {__shfl_down_sync(0xffffffffu, s.mean, by), __shfl_down_sync(0xffffffffu, s.m2, by),
          __shfl_down_sync(0xffffffffu, s.count, by)};
}

template <typename acc_t>
__device__ bn_reduce::GradSums<acc_t> shfl_down(const bn_reduce::GradSums<acc_t>& s, int by) {
  return {__shfl_down_sync(0xffffffffu, s.dz, by), __shfl_down_sync(0xffffffffu, s.dz_xhat, by)};
}

// Channel (blockIdx.x·blockDim.y + threadIdx.y)'s splits merged by one warp
// (bn_reduce::split_lane, then the lanes' tree); lane 0 holds the result.
template <class State>
__device__ State merge_splits_warp(const State* partial, int64_t splits, int64_t C, int64_t c) {
  State s = bn_reduce::split_lane(partial, splits, C, c, threadIdx.x);
  for (int stride = bn_reduce::kFinalLanes / 2; stride > 0; stride >>= 1) {
    const State o = shfl_down(s, stride);
    if (static_cast<int>(threadIdx.x) < stride) s.merge(o);
  }
  return s;
}

constexpr int kFinalWarps = 4;  // channels per finalize block

inline dim3 finalize_grid(int64_t C) { return dim3((C + kFinalWarps - 1) / kFinalWarps); }
inline dim3 finalize_block() { return dim3(bn_reduce::kFinalLanes, kFinalWarps); }

template <typename acc_t>
__global__ void finalize_stats_kernel(const Welford<acc_t>* partial, int64_t splits, int64_t C,
                                      acc_t eps, const acc_t* weight, acc_t* mean,
                                      acc_t* var, acc_t* invstd, acc_t* scale) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (c >= C) return;  // the whole warp: c is the warp's
  const Welford<acc_t> s = merge_splits_warp(partial, splits, C, c);
  if (threadIdx.x == 0) bn_reduce::finalize_stats(s, c, eps, weight, mean, var, invstd, scale);
}

template <typename acc_t>
__global__ void finalize_grad_kernel(const bn_reduce::GradSums<acc_t>* partial, int64_t splits, int64_t C,
                                     acc_t count, const acc_t* weight, const acc_t* invstd,
                                     acc_t* grad_w, acc_t* grad_b, acc_t* consts) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (c >= C) return;
  const bn_reduce::GradSums<acc_t> s = merge_splits_warp(partial, splits, C, c);
  if (threadIdx.x != 0) return;
  grad_b[c] = s.dz;
  grad_w[c] = s.dz_xhat;
  consts[3 * c] = s.dz / count;
  consts[3 * c + 1] = s.dz_xhat / count;
  consts[3 * c + 2] = weight[c] * invstd[c];
}

// dx (and dz as d(residual)) per element, VEC per thread with 16-byte
// accesses; channels as in the epilogue (cuda::PackChannels).
template <typename scalar_t, typename acc_t, int VEC, bool CHANNELS_LAST, typename index_t>
__global__ void bn_act_backward_kernel(const scalar_t* __restrict__ grad_out,
                                       const scalar_t* __restrict__ out,
                                       const scalar_t* __restrict__ x,
                                       const acc_t* __restrict__ mean,
                                       const acc_t* __restrict__ invstd,
                                       const acc_t* __restrict__ consts, scalar_t* grad_x,
                                       scalar_t* grad_res, index_t numel, index_t C, index_t HW,
                                       bool relu) {
  using P = Pack<scalar_t, VEC>;
  const index_t packs = numel / VEC;
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  auto one = [&](acc_t g, acc_t o, acc_t xv, index_t c, acc_t& dz) {
    dz = relu_backward<acc_t>(g, o, relu);
    const acc_t xhat = (xv - mean[c]) * invstd[c];
    return bn_backward_dx<acc_t>(dz, xhat, consts[3 * c], consts[3 * c + 1], consts[3 * c + 2]);
  };
  for (index_t p = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs; p += stride) {
    const P g = reinterpret_cast<const P*>(grad_out)[p];
    const P o = reinterpret_cast<const P*>(out)[p];
    const P xv = reinterpret_cast<const P*>(x)[p];
    const cuda::PackChannels<CHANNELS_LAST, index_t> ch(p * VEC, C, HW);
    P dx, dr;
RF_UNROLL
    for (int k = 0; k < VEC; ++k) {
      acc_t dz;
      dx.v[k] = static_cast<scalar_t>(one(static_cast<acc_t>(g.v[k]), static_cast<acc_t>(o.v[k]),
                                          static_cast<acc_t>(xv.v[k]), ch(k), dz));
      dr.v[k] = static_cast<scalar_t>(dz);
    }
    reinterpret_cast<P*>(grad_x)[p] = dx;
    if (grad_res) reinterpret_cast<P*>(grad_res)[p] = dr;
  }
  for (index_t i = packs * VEC + static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    const index_t c = CHANNELS_LAST ? i % C : (i / HW) % C;
    acc_t dz;
    grad_x[i] = static_cast<scalar_t>(one(static_cast<acc_t>(grad_out[i]), static_cast<acc_t>(out[i]),
                                          static_cast<acc_t>(x[i]), c, dz));
    if (grad_res) grad_res[i] = static_cast<scalar_t>(dz);
  }
}

// The 16-byte path when the shape and every pointer allow it, 32-bit
// indices below 2^31 elements (cuda::with_epilogue_variant's choice; the
// residual flag is the epilogue's and is not used here).
template <typename scalar_t, typename acc_t>
void launch_backward(const bn_reduce::Grads<scalar_t, acc_t>& red, const acc_t* consts, scalar_t* grad_x,
                     scalar_t* grad_res, bool cl, int64_t numel, int64_t C, int64_t HW, cudaStream_t stream) {
  const bool aligned = cuda::aligned16(red.grad_out) && cuda::aligned16(red.out) && cuda::aligned16(red.x) &&
                       cuda::aligned16(grad_x) && (!grad_res || cuda::aligned16(grad_res));
  cuda::with_epilogue_variant<scalar_t>(cl, aligned, false, numel, C, HW,
                                        [&]<int VEC, bool CL, bool, typename index_t>() {
    bn_act_backward_kernel<scalar_t, acc_t, VEC, CL, index_t>
        <<<cuda::elementwise_blocks(numel, VEC), cuda::kElementwiseThreads, 0, stream>>>(
            red.grad_out, red.out, red.x, red.mean, red.invstd, consts, grad_x, grad_res,
            static_cast<index_t>(numel), static_cast<index_t>(C), static_cast<index_t>(HW), red.relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
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
    const int64_t splits = reduce_channels<scalar_t>(bn_reduce::Stats<scalar_t, acc_t>{xp}, {xp}, partial, cl, N,
                                                     C, HW, x.options(), stream);
    finalize_stats_kernel<acc_t><<<finalize_grid(C), finalize_block(), 0, stream>>>(
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
    const bn_reduce::Grads<scalar_t, acc_t> red{g.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(),
                                                x.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(),
                                                invstd.const_data_ptr<acc_t>(), relu};
    at::Tensor partial;
    const int64_t splits =
        reduce_channels<scalar_t>(red, {red.grad_out, red.out, red.x}, partial, cl, N, C, HW, x.options(), stream);
    finalize_grad_kernel<acc_t><<<finalize_grid(C), finalize_block(), 0, stream>>>(
        reinterpret_cast<const bn_reduce::GradSums<acc_t>*>(partial.const_data_ptr()), splits, C,
        static_cast<acc_t>(N * HW), w.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
        grad_w.data_ptr<acc_t>(), grad_b.data_ptr<acc_t>(), consts.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_backward<scalar_t, acc_t>(red, consts.const_data_ptr<acc_t>(), grad_x.data_ptr<scalar_t>(),
                                     residual_grad ? grad_res.data_ptr<scalar_t>() : nullptr, cl, x.numel(), C,
                                     HW, stream);
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
