// Argument checks shared by the CPU-only fp32 ops (conv1x1.cpp, conv_gemm.cpp, grouped_conv.cpp,
// winograd.cpp): errors that name the op, the argument and what it expected.
#pragma once

#include <ATen/ATen.h>

namespace resnet_fused {
namespace cpu {

inline void check_float_cpu(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
}

// a (K, C, R, S) fp32 CPU weight whose output channels fill the GEMM's 16-column groups
inline void check_gemm_weight(const char* op, const at::Tensor& weight, int64_t R, int64_t S, int64_t columns) {
  check_float_cpu(op, weight, "weight");
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == R && weight.size(3) == S, op, ": weight must be (K, C, ", R,
              ", ", S, "), got ", weight.sizes());
  TORCH_CHECK(weight.size(0) % columns == 0, op, ": output channels must be a multiple of ", columns, ", got K=",
              weight.size(0));
}

// an optional bias: fp32 CPU, contiguous, `K` values
inline void check_bias(const char* op, const std::optional<at::Tensor>& bias, int64_t K) {
  if (!bias.has_value() || !bias->defined()) return;
  check_float_cpu(op, *bias, "bias");
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == K && bias->is_contiguous(), op, ": bias must be a contiguous (", K,
              ",) tensor, got ", bias->sizes());
}

// an optional residual of the output's `shape`, fp32 CPU: channels_last (a
// copy where it is not), or undefined where absent
inline at::Tensor channels_last_residual(const char* op, const std::optional<at::Tensor>& residual,
                                         at::IntArrayRef shape) {
  if (!residual.has_value() || !residual->defined()) return at::Tensor();
  check_float_cpu(op, *residual, "residual");
  TORCH_CHECK(residual->sizes() == shape, op, ": residual must be ", shape, ", the output's shape, got ",
              residual->sizes());
  return residual->contiguous(at::MemoryFormat::ChannelsLast);
}

}  // namespace cpu
}  // namespace resnet_fused
