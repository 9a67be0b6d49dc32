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
                               const c10::optional<at::Tensor>& residual, bool relu) {
  const at::MemoryFormat fmt = check_scale_shift_add_relu_args(y, scale, shift, residual);
  if (y.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor res = residual_in_layout(residual, fmt);
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
