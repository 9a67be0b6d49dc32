// Argument checks shared by the CPU and CUDA implementations of
// scale_shift_add_relu_, so both devices reject bad input with the same words.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

namespace resnet_fused {

// Returns the memory format the kernels address `y` in. Both kernels need a
// dense tensor in one of the two layouts; a strided view is rejected because
// the op writes in place and cannot copy `y`.
inline at::MemoryFormat check_scale_shift_add_relu_args(
    const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
    const c10::optional<at::Tensor>& residual) {
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
    TORCH_CHECK(r.sizes() == y.sizes(),
                "scale_shift_add_relu_: residual must have the shape of y ",
                y.sizes(), ", got ", r.sizes());
    TORCH_CHECK(r.scalar_type() == y.scalar_type(),
                "scale_shift_add_relu_: residual must have the dtype of y (",
                y.scalar_type(), "), got ", r.scalar_type());
    TORCH_CHECK(r.device() == y.device(), "scale_shift_add_relu_: residual is on ",
                r.device(), " but y is on ", y.device());
    // residual may be y itself (each element is read before it is written),
    // but not a different view into y's memory.
    const auto overlap = at::get_overlap_status(y, r);
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

}  // namespace resnet_fused
