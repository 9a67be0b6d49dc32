// CUDA kernels of the inference epilogue (scale_shift_add_relu_, bn_eval_add_relu_).
//
// c10/cuda only: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers
// that a bare CUDA toolkit need not have.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../epilogue_checks.h"
#include "common.cuh"

namespace resnet_fused {
namespace {

void scale_shift_add_relu_cuda(at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                               const c10::optional<at::Tensor>& residual, bool relu,
                               int64_t residual_channel_offset) {
  const at::MemoryFormat fmt =
      check_scale_shift_add_relu_args(y, scale, shift, residual, residual_channel_offset);
  if (y.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(y.device());
  // the vectorised kernel reads a dense residual in y's layout: a narrower or
  // strided one is padded/copied first (the triton backend reads it in place)
  const at::Tensor res = residual_in_layout(
      residual_padded_to(residual, y.size(1), residual_channel_offset), fmt);
  const at::Tensor scale_c = scale.contiguous();
  const at::Tensor shift_c = shift.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, y.scalar_type(), "scale_shift_add_relu_cuda", [&] {
        scalar_t* yp = y.data_ptr<scalar_t>();
        cuda::launch_epilogue<scalar_t, float>(
            yp, yp, res.defined() ? res.const_data_ptr<scalar_t>() : nullptr, nullptr,
            scale_c.const_data_ptr<float>(), shift_c.const_data_ptr<float>(),
            fmt == at::MemoryFormat::ChannelsLast, y.numel(), y.size(1), y.size(2) * y.size(3),
            relu, stream);
      });
}

// The BN folded into (scale, shift) by each block into shared memory
// (epilogue.h's bn_scale_shift: torch's CPU bits), then the epilogue over
// the block's share of y: one launch per conv+BN pair, no folded tensors.
template <typename scalar_t, int VEC, bool CHANNELS_LAST, bool HAS_RESIDUAL, typename index_t>
__global__ void bn_eval_epilogue_kernel(scalar_t* y, const scalar_t* __restrict__ residual,
                                        const float* __restrict__ var, const float* __restrict__ mean,
                                        const float* __restrict__ gamma, const float* __restrict__ beta,
                                        const float* __restrict__ bias, float eps, index_t numel, index_t C,
                                        index_t HW, bool relu) {
  extern __shared__ float folded[];  // scale [C], then shift [C]
  for (index_t c = threadIdx.x; c < C; c += blockDim.x) {
    bn_scale_shift(var[c], mean[c], gamma ? gamma + c : nullptr, beta ? beta + c : nullptr,
                   bias ? bias + c : nullptr, eps, folded[c], folded[C + c]);
  }
  __syncthreads();
  cuda::epilogue_loop<scalar_t, float, VEC, CHANNELS_LAST, HAS_RESIDUAL, index_t>(
      y, y, residual, nullptr, folded, folded + C, numel, C, HW, relu);
}

// Each block folds all C channels once: give it at least this many elements
// per channel, so the fold stays a small part of its work.
constexpr int64_t kElementsPerFold = 16;
// Shared memory for the folded vectors within the default 48 KB: C <= 6144
// (resnets reach 2048); wider layers fold in a kernel of their own first.
constexpr int64_t kMaxFoldChannels = 6144;

// One thread per channel, into global memory: the fold for layers wider
// than kMaxFoldChannels.
__global__ void bn_fold_kernel(const float* __restrict__ var, const float* __restrict__ mean,
                               const float* __restrict__ gamma, const float* __restrict__ beta,
                               const float* __restrict__ bias, float eps, float* scale, float* shift,
                               int64_t C) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  bn_scale_shift(var[c], mean[c], gamma ? gamma + c : nullptr, beta ? beta + c : nullptr,
                 bias ? bias + c : nullptr, eps, scale[c], shift[c]);
}

void bn_eval_add_relu_cuda(at::Tensor& y, const c10::optional<at::Tensor>& weight,
                           const c10::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                           const at::Tensor& running_var, double eps, const c10::optional<at::Tensor>& conv_bias,
                           const c10::optional<at::Tensor>& residual, bool relu, int64_t residual_channel_offset) {
  const BnEvalVectors v = bn_eval_vectors(y, weight, bias, running_mean, running_var, eps, conv_bias);
  const int64_t C = y.size(1);
  const c10::cuda::CUDAGuard guard(y.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (C > kMaxFoldChannels) {
    at::Tensor folded = at::empty({2, C}, y.options().dtype(at::kFloat));
    constexpr int kThreads = 256;
    bn_fold_kernel<<<(C + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        v.var.const_data_ptr<float>(), v.mean.const_data_ptr<float>(), BnEvalVectors::ptr(v.weight),
        BnEvalVectors::ptr(v.bias), BnEvalVectors::ptr(v.conv_bias), static_cast<float>(eps),
        folded.data_ptr<float>(), folded.data_ptr<float>() + C, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    scale_shift_add_relu_cuda(y, folded[0], folded[1], residual, relu, residual_channel_offset);
    return;
  }
  // y's and the residual's checks (the C-long fp32 vectors stand in for
  // scale and shift: bn_eval_vectors has checked them already)
  const at::MemoryFormat fmt = check_scale_shift_add_relu_args(y, v.var, v.mean, residual, residual_channel_offset);
  if (y.numel() == 0) return;
  const at::Tensor res = residual_in_layout(residual_padded_to(residual, C, residual_channel_offset), fmt);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const int64_t numel = y.numel(), HW = y.size(2) * y.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_eval_add_relu_cuda", [&] {
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* rp = res.defined() ? res.const_data_ptr<scalar_t>() : nullptr;
    const bool aligned = cuda::aligned16(yp) && (!rp || cuda::aligned16(rp));
    cuda::with_epilogue_variant<scalar_t>(cl, aligned, rp != nullptr, numel, C, HW,
                                          [&]<int VEC, bool CL, bool R, typename index_t>() {
      const int64_t blocks = std::max<int64_t>(
          1, std::min<int64_t>(cuda::elementwise_blocks(numel, VEC), numel / (kElementsPerFold * C)));
      bn_eval_epilogue_kernel<scalar_t, VEC, CL, R, index_t>
          <<<blocks, cuda::kElementwiseThreads, 2 * C * sizeof(float), stream>>>(
              yp, rp, v.var.const_data_ptr<float>(), v.mean.const_data_ptr<float>(), BnEvalVectors::ptr(v.weight),
              BnEvalVectors::ptr(v.bias), BnEvalVectors::ptr(v.conv_bias), static_cast<float>(eps),
              static_cast<index_t>(numel), static_cast<index_t>(C), static_cast<index_t>(HW), relu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("scale_shift_add_relu_", &scale_shift_add_relu_cuda);
  m.impl("bn_eval_add_relu_", &bn_eval_add_relu_cuda);
}

}  // namespace resnet_fused
