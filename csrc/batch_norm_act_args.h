// Argument checking, layout and allocation for batch_norm_act_fwd/bwd, shared
// by the CPU and CUDA implementations so both accept and produce the same
// tensors; each device only supplies its kernels.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "epilogue_checks.h"

namespace resnet_fused {

// Statistics and per-channel math run in fp64 for double x, fp32 otherwise.
inline at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

struct BatchNormActForward {
  bool channels_last;
  int64_t N, C, HW;
  at::Tensor x, weight, bias, residual;  // dense in x's layout; params in acc dtype
  at::Tensor out, mean, invstd, var;     // outputs, allocated
};

// Empty x gets its outputs filled here (mean 0, var 0, invstd 1/sqrt(eps)).
inline BatchNormActForward prepare_batch_norm_act_forward(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps,
    const c10::optional<at::Tensor>& residual) {
  check_batch_norm_act_x(x_in);
  const at::MemoryFormat fmt = kernel_layout(x_in);
  BatchNormActForward a;
  a.channels_last = fmt == at::MemoryFormat::ChannelsLast;
  a.x = x_in.contiguous(fmt);
  const at::ScalarType acc = acc_dtype(a.x);
  a.weight = channel_param("batch_norm_act", "weight", weight, a.x, acc, 1.0);
  a.bias = channel_param("batch_norm_act", "bias", bias, a.x, acc, 0.0);
  if (residual.has_value() && residual->defined()) {
    check_activation("batch_norm_act", "residual", *residual, a.x);
    a.residual = residual->contiguous(fmt);
  }
  a.N = a.x.size(0);
  a.C = a.x.size(1);
  a.HW = a.x.size(2) * a.x.size(3);
  const auto acc_opts = a.x.options().dtype(acc);
  a.out = at::empty_like(a.x, fmt);
  a.mean = at::empty({a.C}, acc_opts);
  a.var = at::empty({a.C}, acc_opts);
  a.invstd = at::empty({a.C}, acc_opts);
  if (a.x.numel() == 0) {
    a.mean.zero_();
    a.var.zero_();
    a.invstd.fill_(1.0 / std::sqrt(eps));
  }
  return a;
}

struct BatchNormActBackward {
  bool channels_last;
  int64_t N, C, HW;
  at::Tensor grad_out, x, out, weight, mean, invstd;  // dense in x's layout / acc dtype
  at::Tensor grad_x, grad_weight, grad_bias, grad_residual;  // outputs (grad_* zeroed)
};

inline BatchNormActBackward prepare_batch_norm_act_backward(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& out,
    const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
    const at::Tensor& invstd, bool residual_grad) {
  check_batch_norm_act_x(x_in);
  check_activation("batch_norm_act_bwd", "grad_out", grad_out, x_in);
  check_activation("batch_norm_act_bwd", "out", out, x_in);
  const at::MemoryFormat fmt = kernel_layout(x_in);
  BatchNormActBackward a;
  a.channels_last = fmt == at::MemoryFormat::ChannelsLast;
  a.x = x_in.contiguous(fmt);
  a.grad_out = grad_out.contiguous(fmt);
  a.out = out.contiguous(fmt);
  const at::ScalarType acc = acc_dtype(a.x);
  a.weight = channel_param("batch_norm_act_bwd", "weight", weight, a.x, acc, 1.0);
  a.mean = channel_param("batch_norm_act_bwd", "mean", mean, a.x, acc, 0.0);
  a.invstd = channel_param("batch_norm_act_bwd", "invstd", invstd, a.x, acc, 1.0);
  a.N = a.x.size(0);
  a.C = a.x.size(1);
  a.HW = a.x.size(2) * a.x.size(3);
  const auto acc_opts = a.x.options().dtype(acc);
  a.grad_x = at::empty_like(a.x, fmt);
  a.grad_residual = residual_grad ? at::empty_like(a.x, fmt) : at::empty({0}, a.x.options());
  a.grad_weight = at::zeros({a.C}, acc_opts);
  a.grad_bias = at::zeros({a.C}, acc_opts);
  return a;
}

}  // namespace resnet_fused
