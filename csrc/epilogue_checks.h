// Argument checks shared by the CPU and CUDA implementations of
// scale_shift_add_relu_, so both devices reject bad input with the same words.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <utility>

namespace resnet_fused {

// Returns the memory format the kernels address `y` in. Both kernels need a
// dense tensor in one of the two layouts; a strided view is rejected because
// the op writes in place and cannot copy `y`.
// A residual may also hold fewer channels than y, C_r, when an offset is
// given (residual_channel_offset >= 0) and offset + C_r <= C: it is added to
// channels [offset, offset + C_r) only (a zero-padded residual without the
// padding). The default offset, -1, asks for a residual of y's shape.
// bn_eval_add_relu_'s BatchNorm tensors: fp32 vectors of length C on y's
// device (the optional ones may be absent), eps non-negative.
inline void check_bn_eval_args(const at::Tensor& y, std::initializer_list<std::pair<const char*, const c10::optional<at::Tensor>*>> vectors,
                               double eps) {
  TORCH_CHECK(y.dim() == 4, "bn_eval_add_relu_: y must be a 4-D (N, C, H, W) tensor, got ", y.dim(), "-D");
  const int64_t C = y.size(1);
  for (const auto& pair : vectors) {
    if (!pair.second->has_value()) continue;
    const at::Tensor& t = **pair.second;
    TORCH_CHECK(t.dim() == 1 && t.size(0) == C, "bn_eval_add_relu_: ", pair.first,
                " must be a 1-D tensor of length C=", C, ", got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kFloat, "bn_eval_add_relu_: ", pair.first,
                " must be float32, got ", t.scalar_type());
    TORCH_CHECK(t.device() == y.device(), "bn_eval_add_relu_: ", pair.first, " is on ", t.device(),
                " but y is on ", y.device());
  }
  TORCH_CHECK(eps >= 0, "bn_eval_add_relu_: eps must be non-negative, got ", eps);
}

// The BN tensors of bn_eval_add_relu_, checked and contiguous, with the
// pointers the fold reads (null where absent).
struct BnEvalVectors {
  at::Tensor weight, bias, mean, var, conv_bias;
  static const float* ptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }
};

inline BnEvalVectors bn_eval_vectors(const at::Tensor& y, const c10::optional<at::Tensor>& weight,
                                     const c10::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                                     const at::Tensor& running_var, double eps,
                                     const c10::optional<at::Tensor>& conv_bias) {
  const c10::optional<at::Tensor> mean = running_mean, var = running_var;
  check_bn_eval_args(y, {{"weight", &weight}, {"bias", &bias}, {"running_mean", &mean}, {"running_var", &var},
                         {"conv_bias", &conv_bias}}, eps);
  auto dense = [](const c10::optional<at::Tensor>& t) { return t.has_value() ? t->contiguous() : at::Tensor(); };
  return {dense(weight), dense(bias), running_mean.contiguous(), running_var.contiguous(), dense(conv_bias)};
}

inline at::MemoryFormat check_scale_shift_add_relu_args(
    const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
    const c10::optional<at::Tensor>& residual, int64_t residual_channel_offset = -1) {
  TORCH_CHECK(y.dim() == 4,
              "scale_shift_add_relu_: y must be a 4-D (N, C, H, W) tensor, got ",
              y.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(y.scalar_type()),
              "scale_shift_add_relu_: y must be floating point (float32, "
              "float16, bfloat16 or float64), got ", y.scalar_type());
  const int64_t C = y.size(1);
  for (const auto& pair : {std::make_pair("scale", &scale),
                           std::make_pair("shift", &shift)}) {
    const at::Tensor& t = *pair.second;
    TORCH_CHECK(t.dim() == 1 && t.size(0) == C, "scale_shift_add_relu_: ",
                pair.first, " must be a 1-D tensor of length C=", C,
                ", got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kFloat, "scale_shift_add_relu_: ",
                pair.first, " must be float32 (the epilogue runs in fp32), got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == y.device(), "scale_shift_add_relu_: ", pair.first,
                " is on ", t.device(), " but y is on ", y.device());
  }
  at::MemoryFormat fmt;
  if (y.is_contiguous()) {
    fmt = at::MemoryFormat::Contiguous;
  } else if (y.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    fmt = at::MemoryFormat::ChannelsLast;
  } else {
    TORCH_CHECK(false,
                "scale_shift_add_relu_: y must be contiguous in NCHW or "
                "channels_last layout (it is written in place), got strides ",
                y.strides());
  }
  at::assert_no_internal_overlap(y);
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    // residual_channel_offset < 0 (the default): the residual must match y
    const bool full = r.sizes() == y.sizes() && residual_channel_offset <= 0;
    TORCH_CHECK(full || (r.dim() == 4 && r.size(0) == y.size(0) && r.size(2) == y.size(2) &&
                         r.size(3) == y.size(3) && residual_channel_offset >= 0 &&
                         residual_channel_offset + r.size(1) <= C),
                "scale_shift_add_relu_: residual must have the shape of y ", y.sizes(),
                ", or y's with C_r channels where residual_channel_offset + C_r <= C; got ",
                r.sizes(), " with residual_channel_offset=", residual_channel_offset);
    TORCH_CHECK(r.scalar_type() == y.scalar_type(),
                "scale_shift_add_relu_: residual must have the dtype of y (",
                y.scalar_type(), "), got ", r.scalar_type());
    TORCH_CHECK(r.device() == y.device(), "scale_shift_add_relu_: residual is on ",
                r.device(), " but y is on ", y.device());
    // residual may be y itself (each element is read before it is written),
    // but not a different view into y's memory.
    auto overlap = at::get_overlap_status(y, r);
    // a strided residual (a subsampled view) is "too hard" to analyse; it is
    // fine as long as it lives in other memory than y
    if (overlap == at::MemOverlapStatus::TooHard && !y.storage().is_alias_of(r.storage()))
      overlap = at::MemOverlapStatus::No;
    TORCH_CHECK(overlap == at::MemOverlapStatus::No ||
                    overlap == at::MemOverlapStatus::Full,
                "scale_shift_add_relu_: residual partially overlaps y; pass y "
                "itself or a tensor that does not share y's memory");
  }
  return fmt;
}

// The residual addressed with y's linear indices: a no-op when it already has
// y's layout, one copy otherwise.
inline at::Tensor residual_in_layout(const c10::optional<at::Tensor>& residual,
                                     at::MemoryFormat fmt) {
  if (!residual.has_value()) return at::Tensor();
  return residual->contiguous(fmt);
}

// A residual with fewer channels than y as the full-channel tensor the
// kernels without a channel offset need: materialised, zeros elsewhere.
inline c10::optional<at::Tensor> residual_padded_to(const c10::optional<at::Tensor>& residual,
                                                    int64_t channels, int64_t offset) {
  if (!residual.has_value() || offset < 0 || (residual->size(1) == channels && offset == 0)) return residual;
  return at::constant_pad_nd(*residual, {0, 0, 0, 0, offset, channels - offset - residual->size(1)}, 0);
}

}  // namespace resnet_fused

namespace resnet_fused {

// The layout the kernels walk for a functional op: channels_last when x is
// in that format, NCHW otherwise (inputs are then made dense in it, which
// copies only tensors that are not already).
inline at::MemoryFormat kernel_layout(const at::Tensor& x) {
  return x.suggest_memory_format() == at::MemoryFormat::ChannelsLast
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

inline void check_activation(const char* op, const char* name, const at::Tensor& t,
                             const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be a 4-D (N, C, H, W) tensor, got ",
              t.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be floating point (float32, float16, bfloat16 or float64), got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have the shape of x ",
              x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name,
              " must have the dtype of x (", x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(),
              " but x is on ", x.device());
}

// Per-channel parameter as a dense vector in the accumulation dtype, or a
// constant vector when absent (weight → 1, bias → 0).
inline at::Tensor channel_param(const char* op, const char* name,
                                const c10::optional<at::Tensor>& t, const at::Tensor& x,
                                at::ScalarType acc, double fill) {
  const int64_t C = x.size(1);
  if (!t.has_value() || !t->defined()) {
    return at::full({C}, fill, x.options().dtype(acc));
  }
  TORCH_CHECK(t->dim() == 1 && t->size(0) == C, op, ": ", name,
              " must be a 1-D tensor of length C=", C, ", got shape ", t->sizes());
  TORCH_CHECK(t->device() == x.device(), op, ": ", name, " is on ", t->device(),
              " but x is on ", x.device());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), op, ": ", name,
              " must be floating point, got ", t->scalar_type());
  return t->to(acc).contiguous();
}

inline void check_batch_norm_act_x(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "batch_norm_act: x must be a 4-D (N, C, H, W) tensor, got ",
              x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "batch_norm_act: x must be floating point (float32, float16, bfloat16 or "
              "float64), got ", x.scalar_type());
  TORCH_CHECK(x.numel() / std::max<int64_t>(x.size(1), 1) > 1 || x.numel() == 0,
              "batch_norm_act: expected more than 1 value per channel when training, got x "
              "of shape ", x.sizes());
}

}  // namespace resnet_fused
