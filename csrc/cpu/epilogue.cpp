// CPU kernels of the inference epilogue (scale_shift_add_relu_).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../epilogue.h"
#include "../epilogue_checks.h"

namespace resnet_fused {
namespace {

// Roughly 32K elements per task: small enough to spread a 56x56x64 feature map
// over several threads, large enough that scheduling costs stay negligible.
constexpr int64_t kGrainElements = 32768;

// channels_last: each row is one pixel's C channels, so the inner loop walks
// scale/shift contiguously and vectorises.
template <typename scalar_t>
void epilogue_rows(scalar_t* y, const scalar_t* r, const float* scale,
                   const float* shift, int64_t rows, int64_t C, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(C, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      scalar_t* yr = y + row * C;
      const scalar_t* rr = r ? r + row * C : nullptr;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t res = rr ? static_cast<acc_t>(rr[c]) : acc_t(0);
        yr[c] = static_cast<scalar_t>(scale_shift_add_act<acc_t>(
            static_cast<acc_t>(yr[c]), scale[c], shift[c], res, relu));
      }
    }
  });
}

// NCHW: each plane is one (n, c) feature map of HW elements sharing one
// scale/shift pair.
template <typename scalar_t>
void epilogue_planes(scalar_t* y, const scalar_t* r, const float* scale,
                     const float* shift, int64_t planes, int64_t C, int64_t HW,
                     bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(HW, 1));
  at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const acc_t s = scale[p % C];
      const acc_t b = shift[p % C];
      scalar_t* yp = y + p * HW;
      const scalar_t* rp = r ? r + p * HW : nullptr;
      for (int64_t i = 0; i < HW; ++i) {
        const acc_t res = rp ? static_cast<acc_t>(rp[i]) : acc_t(0);
        yp[i] = static_cast<scalar_t>(
            scale_shift_add_act<acc_t>(static_cast<acc_t>(yp[i]), s, b, res, relu));
      }
    }
  });
}

void scale_shift_add_relu_cpu(at::Tensor& y, const at::Tensor& scale,
                                     const at::Tensor& shift,
                                     const c10::optional<at::Tensor>& residual,
                                     bool relu) {
  const at::MemoryFormat fmt = check_scale_shift_add_relu_args(y, scale, shift, residual);
  if (y.numel() == 0) return;
  const at::Tensor res = residual_in_layout(residual, fmt);
  const at::Tensor scale_c = scale.contiguous();
  const at::Tensor shift_c = shift.contiguous();
  const int64_t N = y.size(0), C = y.size(1), HW = y.size(2) * y.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, y.scalar_type(), "scale_shift_add_relu_cpu", [&] {
        scalar_t* yp = y.data_ptr<scalar_t>();
        const scalar_t* rp = res.defined() ? res.const_data_ptr<scalar_t>() : nullptr;
        const float* sp = scale_c.const_data_ptr<float>();
        const float* bp = shift_c.const_data_ptr<float>();
        if (fmt == at::MemoryFormat::ChannelsLast) {
          epilogue_rows<scalar_t>(yp, rp, sp, bp, N * HW, C, relu);
        } else {
          epilogue_planes<scalar_t>(yp, rp, sp, bp, N * C, C, HW, relu);
        }
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("scale_shift_add_relu_", &scale_shift_add_relu_cpu);
}

}  // namespace resnet_fused
