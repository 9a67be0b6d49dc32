// CPU kernels of train-mode BatchNorm + residual + ReLU (batch_norm_act_fwd/bwd).
//
// Statistics are two-pass (mean, then squared deviations), accumulated in
// fp32 over short blocks and in double across blocks (cpu::channel_sums), in
// blocks fixed by the shape, so results do not depend on the thread count. Forward = 2 reads of x for the statistics + 1 fused
// normalise/add/ReLU pass; backward = 1 reduction pass + 1 dx pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <type_traits>

#include "../epilogue.h"
#include "../epilogue_checks.h"
#include "epilogue_cpu.h"
#include "loops.h"

namespace resnet_fused {
namespace {

at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_fwd_cpu(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps, const c10::optional<at::Tensor>& residual,
    bool relu) {
  check_batch_norm_act_x(x_in);
  const at::MemoryFormat fmt = kernel_layout(x_in);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(fmt);
  const at::ScalarType acc = acc_dtype(x);
  const at::Tensor w = channel_param("batch_norm_act", "weight", weight, x, acc, 1.0);
  const at::Tensor b = channel_param("batch_norm_act", "bias", bias, x, acc, 0.0);
  at::Tensor res;
  if (residual.has_value() && residual->defined()) {
    check_activation("batch_norm_act", "residual", *residual, x);
    res = residual->contiguous(fmt);
  }
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const int64_t count = N * HW;
  at::Tensor out = at::empty_like(x, fmt);
  at::Tensor mean = at::empty({C}, x.options().dtype(acc));
  at::Tensor var = at::empty({C}, x.options().dtype(acc));
  at::Tensor invstd = at::empty({C}, x.options().dtype(acc));
  if (x.numel() == 0) {
    mean.zero_();
    var.zero_();
    invstd.fill_(1.0 / std::sqrt(eps));
    return {out, mean, invstd, var};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_act_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const std::vector<double> sums = cpu::channel_sums<1, acc_t>(
        cl, N, C, HW, [&](int64_t, int64_t i, acc_t* v) { v[0] = static_cast<acc_t>(xp[i]); });
    std::vector<double> mean_d(C);
    std::vector<acc_t> mean_a(C);
    for (int64_t c = 0; c < C; ++c) {
      mean_d[c] = sums[c] / static_cast<double>(count);
      mean_a[c] = static_cast<acc_t>(mean_d[c]);
    }
    // Deviations from the mean rounded to acc_t: exact enough (|x − m| is
    // small against x exactly when cancellation would hurt) and vectorisable.
    const std::vector<double> sq = cpu::channel_sums<1, acc_t>(cl, N, C, HW, [&](int64_t c, int64_t i, acc_t* v) {
      const acc_t d = static_cast<acc_t>(xp[i]) - mean_a[c];
      v[0] = d * d;
    });
    acc_t* mp = mean.data_ptr<acc_t>();
    acc_t* vp = var.data_ptr<acc_t>();
    acc_t* ip = invstd.data_ptr<acc_t>();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const acc_t* bp = b.const_data_ptr<acc_t>();
    std::vector<acc_t> scale(C);
    for (int64_t c = 0; c < C; ++c) {
      const double v = sq[c] / static_cast<double>(count);
      mp[c] = static_cast<acc_t>(mean_d[c]);
      vp[c] = static_cast<acc_t>(v);
      ip[c] = static_cast<acc_t>(1.0 / std::sqrt(v + eps));
      scale[c] = wp[c] * ip[c];
    }
    cpu::scale_shift_add_act<scalar_t, acc_t>(
        xp, out.data_ptr<scalar_t>(), res.defined() ? res.const_data_ptr<scalar_t>() : nullptr,
        mp, scale.data(), bp, cl, N, C, HW, relu);
  });
  return {out, mean, invstd, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_bwd_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& out_in,
    const c10::optional<at::Tensor>& weight, const at::Tensor& mean_in,
    const at::Tensor& invstd_in, bool relu, bool residual_grad) {
  check_batch_norm_act_x(x_in);
  check_activation("batch_norm_act_bwd", "grad_out", grad_out_in, x_in);
  check_activation("batch_norm_act_bwd", "out", out_in, x_in);
  const at::MemoryFormat fmt = kernel_layout(x_in);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor g = grad_out_in.contiguous(fmt);
  const at::Tensor o = out_in.contiguous(fmt);
  const at::ScalarType acc = acc_dtype(x);
  const at::Tensor w = channel_param("batch_norm_act_bwd", "weight", weight, x, acc, 1.0);
  const at::Tensor mean = channel_param("batch_norm_act_bwd", "mean", mean_in, x, acc, 0.0);
  const at::Tensor invstd = channel_param("batch_norm_act_bwd", "invstd", invstd_in, x, acc, 1.0);
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const int64_t count = N * HW;
  at::Tensor grad_x = at::empty_like(x, fmt);
  at::Tensor grad_res = residual_grad ? at::empty_like(x, fmt) : at::empty({0}, x.options());
  at::Tensor grad_w = at::zeros({C}, x.options().dtype(acc));
  at::Tensor grad_b = at::zeros({C}, x.options().dtype(acc));
  if (x.numel() == 0) return {grad_x, grad_w, grad_b, grad_res};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_act_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* op = o.const_data_ptr<scalar_t>();
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    const acc_t* ip = invstd.const_data_ptr<acc_t>();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const std::vector<double> sums = cpu::channel_sums<2, acc_t>(cl, N, C, HW, [&](int64_t c, int64_t i, acc_t* v) {
      const acc_t dz = relu_backward<acc_t>(static_cast<acc_t>(gp[i]), static_cast<acc_t>(op[i]), relu);
      v[0] = dz;
      v[1] = dz * ((static_cast<acc_t>(xp[i]) - mp[c]) * ip[c]);
    });
    acc_t* gwp = grad_w.data_ptr<acc_t>();
    acc_t* gbp = grad_b.data_ptr<acc_t>();
    std::vector<acc_t> mean_dz(C), mean_dz_xhat(C), k(C);
    for (int64_t c = 0; c < C; ++c) {
      gbp[c] = static_cast<acc_t>(sums[c]);
      gwp[c] = static_cast<acc_t>(sums[C + c]);
      mean_dz[c] = static_cast<acc_t>(sums[c] / static_cast<double>(count));
      mean_dz_xhat[c] = static_cast<acc_t>(sums[C + c] / static_cast<double>(count));
      k[c] = wp[c] * ip[c];
    }
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    scalar_t* grp = residual_grad ? grad_res.data_ptr<scalar_t>() : nullptr;
    auto dx_pass = [&](auto write_residual_grad) {
      auto element = [&](int64_t c, int64_t i) {
        const acc_t dz = relu_backward<acc_t>(static_cast<acc_t>(gp[i]), static_cast<acc_t>(op[i]), relu);
        const acc_t xhat = (static_cast<acc_t>(xp[i]) - mp[c]) * ip[c];
        gxp[i] = static_cast<scalar_t>(bn_backward_dx<acc_t>(dz, xhat, mean_dz[c], mean_dz_xhat[c], k[c]));
        if constexpr (decltype(write_residual_grad)::value) grp[i] = static_cast<scalar_t>(dz);
      };
      cpu::for_each_channel_run(
          cl, N, C, HW,
          [&](int64_t c, int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i) element(c, i);
          },
          [&](int64_t base) {
            for (int64_t c = 0; c < C; ++c) element(c, base + c);
          });
    };
    if (grp) dx_pass(std::true_type{});
    else dx_pass(std::false_type{});
  });
  return {grad_x, grad_w, grad_b, grad_res};
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("batch_norm_act_fwd", &batch_norm_act_fwd_cpu);
  m.impl("batch_norm_act_bwd", &batch_norm_act_bwd_cpu);
}

}  // namespace resnet_fused
