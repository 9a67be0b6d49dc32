// CUDA kernels of the inference epilogue (scale_shift_add_relu_).
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

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("scale_shift_add_relu_", &scale_shift_add_relu_cuda);
}

}  // namespace resnet_fused
