// CPU kernels of resnet_fused::conv1x1_weight, conv1x1 and conv1x1_add_: a
// 1x1 convolution (stride s, no padding) on channels_last fp32 activations as
// one GEMM (gemm.h) with the inference epilogue act(conv + bias + residual)
// applied before the one store. Channels_last makes a 1x1 convolution a
// product of the (pixels x C) activations, read in place (every s-th pixel
// of every s-th row for stride s), and the (C x K) weights, packed once into
// panels of 64 output channels (conv1x1_weight). The packed layout does not
// depend on the input size, so one packing serves every batch and map size.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include "checks.h"
#include "gemm_plan.h"
#include "output_cache.h"

namespace resnet_fused {
namespace {

using cpu::check_float_cpu;

at::Tensor conv1x1_weight_cpu(const at::Tensor& weight) {
  cpu::check_gemm_weight("conv1x1_weight", weight, 1, 1, cpu::gemm::kColumns);
  const int64_t K = weight.size(0), C = weight.size(1);
  // panels of 64 output channels (gemm.h kPanel), the last one narrower:
  // B (C x K) is the weight transposed
  const at::Tensor w = weight.contiguous();
  at::Tensor packed = at::empty({K * C}, weight.options());
  cpu::gemm::pack(w.data_ptr<float>(), C, K, 1, C, packed.data_ptr<float>());
  return packed;
}

struct Shapes {
  int64_t N, C, H, W, K, P, Q;
};

Shapes check_conv1x1(const char* op, const at::Tensor& x, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, int64_t stride) {
  check_float_cpu(op, x, "x");
  check_float_cpu(op, weight, "weight");
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous(), op,
              ": weight must be a contiguous 1-D tensor from conv1x1_weight, got ", weight.sizes());
  TORCH_CHECK(stride >= 1, op, ": stride must be at least 1, got ", stride);
  Shapes s;
  s.N = x.size(0), s.C = x.size(1), s.H = x.size(2), s.W = x.size(3);
  TORCH_CHECK(s.C > 0 && weight.numel() % s.C == 0 && (weight.numel() / s.C) % cpu::gemm::kColumns == 0, op,
              ": weight (", weight.numel(), " values) does not hold a multiple of ", cpu::gemm::kColumns,
              " output channels of x's ", s.C, " input channels");
  s.K = weight.numel() / s.C;
  s.P = (s.H - 1) / stride + 1, s.Q = (s.W - 1) / stride + 1;
  if (s.H == 0) s.P = 0;
  if (s.W == 0) s.Q = 0;
  cpu::check_bias(op, bias, s.K);
  return s;
}

cpu::gemm::Problem problem(const Shapes& s, const at::Tensor& xc, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, const float* residual, float* out, bool relu,
                           int64_t stride) {
  const cpu::gemm::Rows rows{xc.data_ptr<float>(), s.C, stride, s.H, s.W, s.P, s.Q};
  cpu::gemm::Problem p = cpu::gemm::product(rows, s.C, weight.data_ptr<float>(), s.K, out, s.K);
  p.bias = bias.has_value() && bias->defined() ? bias->data_ptr<float>() : nullptr;
  p.residual = residual;
  p.ldr = s.K;
  p.relu = relu;
  return p;
}

bool is_channels_last(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

at::Tensor conv1x1_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& residual_opt, bool relu, int64_t stride) {
  const Shapes s = check_conv1x1("conv1x1", x, weight, bias, stride);
  const at::Tensor residual = cpu::channels_last_residual("conv1x1", residual_opt, {s.N, s.K, s.P, s.Q});
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor y = cpu::empty_output({s.N, s.K, s.P, s.Q}, x.options(), at::MemoryFormat::ChannelsLast);
  const cpu::gemm::Problem p = problem(s, xc, weight, bias, residual.defined() ? residual.data_ptr<float>() : nullptr,
                                       y.data_ptr<float>(), relu, stride);
  cpu::gemm::run(p, s.N * s.P * s.Q, s.K);
  return is_channels_last(x) ? y : y.contiguous();
}

// residual = act(conv(x) + bias + residual), in place: the residual is read
// and overwritten element by element in the epilogue, so no output buffer.
void conv1x1_add_cpu(at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, bool relu, int64_t stride) {
  const Shapes s = check_conv1x1("conv1x1_add_", x, weight, bias, stride);
  check_float_cpu("conv1x1_add_", residual, "residual");
  TORCH_CHECK(residual.sizes() == at::IntArrayRef({s.N, s.K, s.P, s.Q}), "conv1x1_add_: residual must be ",
              at::IntArrayRef({s.N, s.K, s.P, s.Q}), ", the output's shape, got ", residual.sizes());
  TORCH_CHECK(residual.is_contiguous(at::MemoryFormat::ChannelsLast), "conv1x1_add_: residual must be channels_last");
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  // partial sums over k blocks go through the output before the epilogue
  // reads the residual there: give those products a buffer of their own
  const bool blocked = cpu::gemm::k_block(s.C) < s.C;
  TORCH_CHECK(at::get_overlap_status(residual, xc) == at::MemOverlapStatus::No,
              "conv1x1_add_: residual must not share memory with x");
  at::Tensor out = blocked ? cpu::empty_output(residual.sizes(), residual.options(), at::MemoryFormat::ChannelsLast) : residual;
  const cpu::gemm::Problem p = problem(s, xc, weight, bias, residual.data_ptr<float>(), out.data_ptr<float>(), relu, stride);
  cpu::gemm::run(p, s.N * s.P * s.Q, s.K);
  if (blocked) residual.copy_(out);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("conv1x1_weight", &conv1x1_weight_cpu);
  m.impl("conv1x1", &conv1x1_cpu);
  m.impl("conv1x1_add_", &conv1x1_add_cpu);
}

}  // namespace resnet_fused
