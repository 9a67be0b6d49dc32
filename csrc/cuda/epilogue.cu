// CUDA kernels of the inference epilogue (scale_shift_add_relu_).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
// c10/cuda only: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers
// that a bare CUDA toolkit need not have.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../epilogue.h"
#include "../epilogue_checks.h"

namespace resnet_fused {
namespace {

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

// One thread handles VEC consecutive elements with one 16-byte load/store.
// The launcher guarantees those VEC elements never straddle a row (NHWC: C is
// a multiple of VEC) or a plane (NCHW: H*W is a multiple of VEC), so a pack
// needs one channel lookup. All indices are int64: a 2,612 x 256x56x56 batch
// passes 2^31 elements.
template <typename scalar_t, int VEC, bool CHANNELS_LAST, bool HAS_RESIDUAL>
__global__ void scale_shift_add_relu_kernel(scalar_t* __restrict__ y,
                                            const scalar_t* __restrict__ r,
                                            const float* __restrict__ scale,
                                            const float* __restrict__ shift,
                                            int64_t numel, int64_t C, int64_t HW,
                                            bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t packs = numel / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       p < packs; p += stride) {
    const int64_t i = p * VEC;
    Pack<scalar_t, VEC> yv = reinterpret_cast<const Pack<scalar_t, VEC>*>(y)[p];
    Pack<scalar_t, VEC> rv;
    if (HAS_RESIDUAL) rv = reinterpret_cast<const Pack<scalar_t, VEC>*>(r)[p];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t c = CHANNELS_LAST ? (i + k) % C : (i / HW) % C;
      const acc_t res = HAS_RESIDUAL ? static_cast<acc_t>(rv.v[k]) : acc_t(0);
      yv.v[k] = static_cast<scalar_t>(scale_shift_add_act<acc_t>(
          static_cast<acc_t>(yv.v[k]), __ldg(scale + c), __ldg(shift + c), res, relu));
    }
    reinterpret_cast<Pack<scalar_t, VEC>*>(y)[p] = yv;
  }
}

template <typename scalar_t, int VEC, bool CL>
void launch(scalar_t* y, const scalar_t* r, const float* s, const float* b,
            int64_t numel, int64_t C, int64_t HW, bool relu, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t packs = numel / VEC;
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t blocks = std::min<int64_t>((packs + kThreads - 1) / kThreads,
                                           static_cast<int64_t>(sms) * 32);
  if (r) {
    scale_shift_add_relu_kernel<scalar_t, VEC, CL, true>
        <<<blocks, kThreads, 0, stream>>>(y, r, s, b, numel, C, HW, relu);
  } else {
    scale_shift_add_relu_kernel<scalar_t, VEC, CL, false>
        <<<blocks, kThreads, 0, stream>>>(y, r, s, b, numel, C, HW, relu);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

void scale_shift_add_relu_cuda(at::Tensor& y, const at::Tensor& scale,
                                      const at::Tensor& shift,
                                      const c10::optional<at::Tensor>& residual,
                                      bool relu) {
  const at::MemoryFormat fmt = check_scale_shift_add_relu_args(y, scale, shift, residual);
  if (y.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor res = residual_in_layout(residual, fmt);
  const at::Tensor scale_c = scale.contiguous();
  const at::Tensor shift_c = shift.contiguous();
  const int64_t C = y.size(1), HW = y.size(2) * y.size(3), numel = y.numel();
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, y.scalar_type(), "scale_shift_add_relu_cuda", [&] {
        constexpr int kVec = 16 / sizeof(scalar_t);
        scalar_t* yp = y.data_ptr<scalar_t>();
        const scalar_t* rp = res.defined() ? res.const_data_ptr<scalar_t>() : nullptr;
        const float* sp = scale_c.const_data_ptr<float>();
        const float* bp = shift_c.const_data_ptr<float>();
        const int64_t run = cl ? C : HW;  // elements sharing a row/plane
        const bool vec_ok = run % kVec == 0 && aligned16(yp) && (!rp || aligned16(rp));
        if (vec_ok) {
          if (cl) launch<scalar_t, kVec, true>(yp, rp, sp, bp, numel, C, HW, relu, stream);
          else launch<scalar_t, kVec, false>(yp, rp, sp, bp, numel, C, HW, relu, stream);
        } else {
          if (cl) launch<scalar_t, 1, true>(yp, rp, sp, bp, numel, C, HW, relu, stream);
          else launch<scalar_t, 1, false>(yp, rp, sp, bp, numel, C, HW, relu, stream);
        }
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("scale_shift_add_relu_", &scale_shift_add_relu_cuda);
}

}  // namespace resnet_fused
