// CPU kernels of resnet_fused::conv_gemm_weight and conv_gemm: an R x S
// convolution (stride s, padding p both ways, one group) on fp32 activations
// as one implicit GEMM (gemm.h) with the inference epilogue act(conv + bias +
// residual) applied before the one store. The input is copied once into a
// zero-padded channels_last map; row m of A (output pixel (n, y, x)) is then
// its R kernel rows' S * C contiguous values each (gemm.h Rows::run), read in
// place — no im2col matrix. B is the weight as (R * S * C) x K, packed once
// into the GEMM's panels (the layout does not depend on the input size).
//
// Where it runs (resnet_fused/ops/cpu/onednn.py `_conv_gemm_fits`): by
// default the stem (fewer than 16 input channels) where the GEMM kernel is
// AVX2, 1.1-1.7x oneDNN's direct kernel there; oneDNN is level or faster on the
// 3x3 layers (docs/performance.md).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "checks.h"
#include "gemm_plan.h"
#include "output_cache.h"

namespace resnet_fused {
namespace {

using cpu::check_float_cpu;

at::Tensor conv_gemm_weight_cpu(const at::Tensor& weight) {
  check_float_cpu("conv_gemm_weight", weight, "weight");
  TORCH_CHECK(weight.dim() == 4, "conv_gemm_weight: weight must be (K, C, R, S), got ", weight.sizes());
  cpu::check_gemm_weight("conv_gemm_weight", weight, weight.size(2), weight.size(3), cpu::gemm::kColumns);
  const int64_t K = weight.size(0), RSC = weight.size(1) * weight.size(2) * weight.size(3);
  // B's row (r * S + s) * C + c is tap (r, s) of input channel c
  const at::Tensor w = weight.permute({0, 2, 3, 1}).contiguous();
  at::Tensor packed = at::empty({K * RSC}, weight.options());
  cpu::gemm::pack(w.data_ptr<float>(), RSC, K, 1, RSC, packed.data_ptr<float>());
  return packed;
}

at::Tensor conv_gemm_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& residual_opt, bool relu, at::IntArrayRef kernel_size,
                         int64_t stride, int64_t padding) {
  constexpr const char* op = "conv_gemm";
  check_float_cpu(op, x, "x");
  check_float_cpu(op, weight, "weight");
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(kernel_size.size() == 2 && kernel_size[0] >= 1 && kernel_size[1] >= 1, op,
              ": kernel_size must be two positive sizes (R, S), got ", kernel_size);
  TORCH_CHECK(stride >= 1, op, ": stride must be at least 1, got ", stride);
  TORCH_CHECK(padding >= 0, op, ": padding must be at least 0, got ", padding);
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous(), op,
              ": weight must be a contiguous 1-D tensor from conv_gemm_weight, got ", weight.sizes());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t R = kernel_size[0], S = kernel_size[1], RSC = R * S * C;
  TORCH_CHECK(C > 0 && weight.numel() % RSC == 0 && (weight.numel() / RSC) % cpu::gemm::kColumns == 0, op,
              ": weight (", weight.numel(), " values) does not hold a multiple of ", cpu::gemm::kColumns,
              " output channels of ", R, "x", S, " taps over x's ", C, " input channels");
  const int64_t K = weight.numel() / RSC, Hp = H + 2 * padding, Wp = W + 2 * padding;
  TORCH_CHECK(Hp >= R && Wp >= S, op, ": the padded input (", Hp, "x", Wp, ") is smaller than the kernel (", R, "x",
              S, ")");
  const int64_t P = (Hp - R) / stride + 1, Q = (Wp - S) / stride + 1;
  cpu::check_bias(op, bias, K);
  const at::Tensor residual = cpu::channels_last_residual(op, residual_opt, {N, K, P, Q});
  at::Tensor y = cpu::empty_output({N, K, P, Q}, x.options(), at::MemoryFormat::ChannelsLast);
  if (N * P * Q > 0) {
    // the zero-padded channels_last input, rows (n, h) copied in parallel
    const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
    at::Tensor xp = cpu::empty_output({N, C, Hp, Wp}, x.options(), at::MemoryFormat::ChannelsLast);
    const float* src = xc.data_ptr<float>();
    float* dst = xp.data_ptr<float>();
    const int64_t row = Wp * C, left = padding * C;
    at::parallel_for(0, N * Hp, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / Hp, h = t % Hp - padding;
        float* out = dst + t * row;
        if (h < 0 || h >= H) {
          std::memset(out, 0, row * sizeof(float));
          continue;
        }
        std::memset(out, 0, left * sizeof(float));
        std::memcpy(out + left, src + (n * H + h) * W * C, W * C * sizeof(float));
        std::memset(out + left + W * C, 0, left * sizeof(float));
      }
    });
    cpu::gemm::Rows rows{dst, C, stride, Hp, Wp, P, Q};
    rows.run = S * C, rows.run_stride = row;
    cpu::gemm::Problem p = cpu::gemm::product(rows, RSC, weight.data_ptr<float>(), K, y.data_ptr<float>(), K);
    p.bias = bias.has_value() && bias->defined() ? bias->data_ptr<float>() : nullptr;
    p.residual = residual.defined() ? residual.data_ptr<float>() : nullptr;
    p.ldr = K;
    p.relu = relu;
    cpu::gemm::run(p, N * P * Q, K);
  }
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous() ? y : y.contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("conv_gemm_weight", &conv_gemm_weight_cpu);
  m.impl("conv_gemm", &conv_gemm_cpu);
}

}  // namespace resnet_fused
