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
  // residual_strided: `residual` is the caller's tensor as given (any
  // strides, channels [residual_offset, + its channels) of the output)
  bool residual_strided = false;
  int64_t residual_offset = 0;
};

// A residual with fewer channels than x (added to channels [offset, offset +
// C_r)) or any strides, when an offset >= 0 is given (-1: it must match x). read_in_place: the device's kernel reads it through
// its strides; otherwise it is padded/copied to a dense tensor in x's layout.
inline bool check_narrow_residual(const char* op, const at::Tensor& r, const at::Tensor& x,
                                  int64_t offset) {
  if (offset < 0 || (r.sizes() == x.sizes() && offset == 0)) return false;  // must match x
  TORCH_CHECK(r.dim() == 4 && r.size(0) == x.size(0) && r.size(2) == x.size(2) &&
                  r.size(3) == x.size(3) && offset >= 0 && offset + r.size(1) <= x.size(1),
              op, ": residual must have the shape of x ", x.sizes(),
              ", or x's with C_r channels where residual_channel_offset + C_r <= C; got ", r.sizes(),
              " with residual_channel_offset=", offset);
  TORCH_CHECK(r.scalar_type() == x.scalar_type(), op, ": residual must have the dtype of x (",
              x.scalar_type(), "), got ", r.scalar_type());
  TORCH_CHECK(r.device() == x.device(), op, ": residual is on ", r.device(), " but x is on ",
              x.device());
  return true;
}

// Empty x gets its outputs filled here (mean 0, var 0, invstd 1/sqrt(eps)).
inline BatchNormActForward prepare_batch_norm_act_forward(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps,
    const c10::optional<at::Tensor>& residual, int64_t residual_channel_offset = -1,
    bool read_in_place = false) {
  check_batch_norm_act_x(x_in);
  const at::MemoryFormat fmt = kernel_layout(x_in);
  BatchNormActForward a;
  a.channels_last = fmt == at::MemoryFormat::ChannelsLast;
  a.x = x_in.contiguous(fmt);
  const at::ScalarType acc = acc_dtype(a.x);
  a.weight = channel_param("batch_norm_act", "weight", weight, a.x, acc, 1.0);
  a.bias = channel_param("batch_norm_act", "bias", bias, a.x, acc, 0.0);
  if (residual.has_value() && residual->defined()) {
    const at::Tensor& r = *residual;
    const bool narrow = r.dim() == 4 && check_narrow_residual("batch_norm_act", r, a.x, residual_channel_offset);
    if (!narrow) {
      check_activation("batch_norm_act", "residual", r, a.x);
      a.residual = r.contiguous(fmt);
    } else if (read_in_place) {
      a.residual = r;
      a.residual_strided = true;
      a.residual_offset = residual_channel_offset;
    } else {
      a.residual = residual_padded_to(residual, a.x.size(1), residual_channel_offset)->contiguous(fmt);
    }
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
  // grad_residual holds channels [residual_offset, + residual_channels) only
  int64_t residual_channels = 0, residual_offset = 0;
};

// residual_channels < 0: all of x's (the common case).
inline BatchNormActBackward prepare_batch_norm_act_backward(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& out,
    const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
    const at::Tensor& invstd, bool residual_grad, int64_t residual_channels = -1,
    int64_t residual_channel_offset = 0) {
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
  a.residual_channels = residual_channels < 0 ? a.C : residual_channels;
  a.residual_offset = residual_channel_offset;
  TORCH_CHECK(a.residual_offset >= 0 && a.residual_channels >= 0 &&
                  a.residual_offset + a.residual_channels <= a.C,
              "batch_norm_act_bwd: residual_channel_offset + residual_channels must be within x's ",
              a.C, " channels, got ", a.residual_offset, " + ", a.residual_channels);
  a.grad_residual = residual_grad ? at::empty({a.N, a.residual_channels, a.x.size(2), a.x.size(3)},
                                              a.x.options().memory_format(fmt))
                                  : at::empty({0}, a.x.options());
  a.grad_weight = at::zeros({a.C}, acc_opts);
  a.grad_bias = at::zeros({a.C}, acc_opts);
  return a;
}

}  // namespace resnet_fused
