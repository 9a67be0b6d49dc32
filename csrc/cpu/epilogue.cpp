// CPU kernels of the inference epilogue (scale_shift_add_relu_, bn_eval_add_relu_).
#include <ATen/ATen.h>
#include <algorithm>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../epilogue.h"
#include "../epilogue_checks.h"
#include "epilogue_cpu.h"

namespace resnet_fused {
namespace {

void scale_shift_add_relu_cpu(at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                              const c10::optional<at::Tensor>& residual, bool relu,
                              int64_t residual_channel_offset) {
  const at::MemoryFormat fmt =
      check_scale_shift_add_relu_args(y, scale, shift, residual, residual_channel_offset);
  if (y.numel() == 0) return;
  const at::Tensor scale_c = scale.contiguous();
  const at::Tensor shift_c = shift.contiguous();
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  if (residual.has_value() && !(residual->sizes() == y.sizes() && residual->is_contiguous(fmt))) {
    // narrower (channel offset), strided or in the other layout: read in place
    const at::Tensor& r = *residual;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, y.scalar_type(), "scale_shift_add_relu_cpu_strided", [&] {
          const cpu::StridedResidual<scalar_t> view{
              r.const_data_ptr<scalar_t>(), r.stride(0), r.stride(1), r.stride(2), r.stride(3),
              std::max<int64_t>(residual_channel_offset, 0), r.size(1)};
          scalar_t* yp = y.data_ptr<scalar_t>();
          cpu::scale_shift_add_act_strided<scalar_t, float>(
              yp, yp, view, nullptr, scale_c.const_data_ptr<float>(), shift_c.const_data_ptr<float>(),
              channels_last, y.size(0), y.size(1), y.size(2), y.size(3), relu);
        });
    return;
  }
  const at::Tensor res = residual_in_layout(residual, fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, y.scalar_type(), "scale_shift_add_relu_cpu", [&] {
        using acc_t = cpu::acc_type<scalar_t>;
        // fp32 parameters; a float64 output computes in float64
        const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
        const at::Tensor s = scale_c.to(acc_dtype), b = shift_c.to(acc_dtype);
        cpu::scale_shift_add_act<scalar_t>(
            y.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
            res.defined() ? res.const_data_ptr<scalar_t>() : nullptr, nullptr,
            s.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
            fmt == at::MemoryFormat::ChannelsLast, y.size(0), y.size(1), y.size(2) * y.size(3),
            relu);
      });
}

void bn_eval_add_relu_cpu(at::Tensor& y, const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                          const at::Tensor& running_var, double eps, const c10::optional<at::Tensor>& conv_bias,
                          const c10::optional<at::Tensor>& residual, bool relu, int64_t residual_channel_offset) {
  const BnEvalVectors v = bn_eval_vectors(y, weight, bias, running_mean, running_var, eps, conv_bias);
  const int64_t C = y.size(1);
  at::Tensor scale = at::empty({C}, y.options().dtype(at::kFloat));
  at::Tensor shift = at::empty({C}, y.options().dtype(at::kFloat));
  float* s = scale.data_ptr<float>();
  float* b = shift.data_ptr<float>();
  const float *g = BnEvalVectors::ptr(v.weight), *be = BnEvalVectors::ptr(v.bias),
              *cb = BnEvalVectors::ptr(v.conv_bias);
  const float *mp = v.mean.const_data_ptr<float>(), *vp = v.var.const_data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    bn_scale_shift(vp[c], mp[c], g ? g + c : nullptr, be ? be + c : nullptr, cb ? cb + c : nullptr,
                   static_cast<float>(eps), s[c], b[c]);
  }
  scale_shift_add_relu_cpu(y, scale, shift, residual, relu, residual_channel_offset);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("scale_shift_add_relu_", &scale_shift_add_relu_cpu);
  m.impl("bn_eval_add_relu_", &bn_eval_add_relu_cpu);
}

}  // namespace resnet_fused
