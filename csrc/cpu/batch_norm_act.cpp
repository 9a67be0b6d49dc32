// CPU kernels of train-mode BatchNorm + residual + ReLU (batch_norm_act_fwd/bwd).
//
// Statistics are two-pass (mean, then squared deviations), accumulated in
// fp32 over short blocks and in double across blocks (cpu::channel_sums), in
// blocks fixed by the shape, so results do not depend on the thread count.
// Forward = 2 reads of x for the statistics + 1 fused normalise/add/ReLU
// pass; backward = 1 reduction pass + 1 dx pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "../epilogue.h"
#include "../batch_norm_act_args.h"
#include "epilogue_cpu.h"
#include "loops.h"

namespace resnet_fused {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_fwd_cpu(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps, const c10::optional<at::Tensor>& residual,
    bool relu, int64_t residual_channel_offset) {
  const BatchNormActForward a = prepare_batch_norm_act_forward(
      x_in, weight, bias, eps, residual, residual_channel_offset, /*read_in_place=*/true);
  if (a.x.numel() == 0) return {a.out, a.mean, a.invstd, a.var};
  const bool cl = a.channels_last;
  const int64_t N = a.N, C = a.C, HW = a.HW, count = N * HW;
  const at::Tensor &x = a.x, &w = a.weight, &b = a.bias, &res = a.residual;
  const at::Tensor &out = a.out, &mean = a.mean, &var = a.var, &invstd = a.invstd;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_act_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const std::vector<double> sums =
        cpu::channel_sums<scalar_t>(cpu::SumKind::Value, cl, N, C, HW, xp, nullptr, nullptr, nullptr, nullptr, false);
    acc_t* mp = mean.data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) mp[c] = static_cast<acc_t>(sums[c] / static_cast<double>(count));
    const std::vector<double> sq = cpu::channel_sums<scalar_t>(cpu::SumKind::SquaredDeviation, cl, N, C, HW, xp,
                                                               nullptr, nullptr, mp, nullptr, false);
    acc_t* vp = var.data_ptr<acc_t>();
    acc_t* ip = invstd.data_ptr<acc_t>();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const acc_t* bp = b.const_data_ptr<acc_t>();
    std::vector<acc_t> scale(C);
    for (int64_t c = 0; c < C; ++c) {
      const double v = sq[c] / static_cast<double>(count);
      vp[c] = static_cast<acc_t>(v);
      ip[c] = static_cast<acc_t>(1.0 / std::sqrt(v + eps));
      scale[c] = wp[c] * ip[c];
    }
    if (a.residual_strided) {  // narrower or strided: read in place
      const cpu::StridedResidual<scalar_t> view{res.const_data_ptr<scalar_t>(), res.stride(0), res.stride(1),
                                                res.stride(2), res.stride(3), a.residual_offset, res.size(1)};
      cpu::scale_shift_add_act_strided<scalar_t, acc_t>(xp, out.data_ptr<scalar_t>(), view, mp, scale.data(), bp,
                                                        cl, N, C, x.size(2), x.size(3), relu);
    } else {
      cpu::scale_shift_add_act<scalar_t>(
          xp, out.data_ptr<scalar_t>(), res.defined() ? res.const_data_ptr<scalar_t>() : nullptr,
          mp, scale.data(), bp, cl, N, C, HW, relu);
    }
  });
  return {a.out, a.mean, a.invstd, a.var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_bwd_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& out_in,
    const c10::optional<at::Tensor>& weight, const at::Tensor& mean_in,
    const at::Tensor& invstd_in, bool relu, bool residual_grad, int64_t residual_channels,
    int64_t residual_channel_offset) {
  const BatchNormActBackward a = prepare_batch_norm_act_backward(
      grad_out_in, x_in, out_in, weight, mean_in, invstd_in, residual_grad, residual_channels,
      residual_channel_offset);
  if (a.x.numel() == 0) return {a.grad_x, a.grad_weight, a.grad_bias, a.grad_residual};
  const bool cl = a.channels_last;
  const int64_t N = a.N, C = a.C, HW = a.HW, count = N * HW;
  const at::Tensor &x = a.x, &g = a.grad_out, &o = a.out, &w = a.weight, &mean = a.mean,
                   &invstd = a.invstd;
  const at::Tensor &grad_x = a.grad_x, &grad_w = a.grad_weight, &grad_b = a.grad_bias,
                   &grad_res = a.grad_residual;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_act_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* op = o.const_data_ptr<scalar_t>();
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    const acc_t* ip = invstd.const_data_ptr<acc_t>();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const std::vector<double> sums =
        cpu::channel_sums<scalar_t>(cpu::SumKind::Backward, cl, N, C, HW, xp, gp, op, mp, ip, relu);
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
    // grad_residual may hold channels [c0, c0 + CR) only (a narrower residual)
    const int64_t CR = a.residual_channels, c0 = a.residual_offset;
    const bool narrow = CR != C;
    cpu::for_each_channel_run(
        cl, N, C, HW,
        [&](int64_t c, int64_t begin, int64_t end) {
          // the plane's offset in grad_residual; none outside its channels
          const int64_t n = begin / (C * HW);
          const bool in_range = grp && c >= c0 && c < c0 + CR;
          scalar_t* gr = in_range ? grp + (!narrow ? begin : (n * CR + (c - c0)) * HW) : nullptr;
          cpu::run_dx<scalar_t>(gp + begin, op + begin, xp + begin, gxp + begin, gr, end - begin, mp[c], ip[c],
                                mean_dz[c], mean_dz_xhat[c], k[c], relu);
        },
        [&](int64_t row_begin, int64_t row_end) {
          const int64_t base = row_begin * C;
          cpu::rows_dx<scalar_t>(gp + base, op + base, xp + base, gxp + base, row_end - row_begin, C, mp, ip,
                                 mean_dz.data(), mean_dz_xhat.data(), k.data(), relu,
                                 grp ? grp + row_begin * CR : nullptr, CR, c0, c0 + CR);
        });
  });
  return {a.grad_x, a.grad_weight, a.grad_bias, a.grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("batch_norm_act_fwd", &batch_norm_act_fwd_cpu);
  m.impl("batch_norm_act_bwd", &batch_norm_act_bwd_cpu);
}

}  // namespace resnet_fused
