// Autograd for batch_norm_act_fwd, for every device: a C++ autograd
// Function whose backward is batch_norm_act_bwd. Written in C++ rather than
// with torch.library.register_autograd because the Python route costs some
// 100 us of interpreter time per layer and step (fill_defaults, the Python
// Function, setup_context, backward), a tenth of a small training step.
//
// Saved: x, out (only with ReLU: it feeds the ReLU mask; the next layer keeps
// it anyway), weight, and mean and invstd (C values each) — docs/performance.md "What
// training saves". The same contract as ops/common.bn_autograd, which the
// Triton ops use.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace resnet_fused {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

FwdResult call_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                   const c10::optional<at::Tensor>& bias, double eps,
                   const c10::optional<at::Tensor>& residual, bool relu, int64_t residual_channel_offset) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("resnet_fused::batch_norm_act_fwd", "")
                       .typed<FwdResult(const at::Tensor&, const c10::optional<at::Tensor>&,
                                        const c10::optional<at::Tensor>&, double,
                                        const c10::optional<at::Tensor>&, bool, int64_t)>();
  return op.call(x, weight, bias, eps, residual, relu, residual_channel_offset);
}

FwdResult call_bwd(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& out,
                   const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
                   const at::Tensor& invstd, bool relu, bool residual_grad, int64_t residual_channels,
                   int64_t residual_channel_offset) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("resnet_fused::batch_norm_act_bwd", "")
                       .typed<FwdResult(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const c10::optional<at::Tensor>&, const at::Tensor&,
                                        const at::Tensor&, bool, bool, int64_t, int64_t)>();
  return op.call(grad_out, x, out, weight, mean, invstd, relu, residual_grad, residual_channels,
                 residual_channel_offset);
}

c10::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

class BatchNormActFunction : public torch::autograd::Function<BatchNormActFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias, double eps,
                               const c10::optional<at::Tensor>& residual, bool relu,
                               int64_t residual_channel_offset) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mean, invstd, var] = call_fwd(x, weight, bias, eps, residual, relu, residual_channel_offset);
    const bool has_weight = weight.has_value() && weight->defined();
    const bool has_bias = bias.has_value() && bias->defined();
    const bool has_residual = residual.has_value() && residual->defined();
    // needs_input_grad counts tensor inputs only, so absent optionals shift
    // the indices of the later ones
    int64_t edge = 1;
    ctx->saved_data["weight_edge"] = has_weight ? edge++ : int64_t(-1);
    ctx->saved_data["bias_edge"] = has_bias ? edge++ : int64_t(-1);
    ctx->saved_data["residual_edge"] = has_residual ? edge++ : int64_t(-1);
    // a narrower residual (offset >= 0): its gradient has its channel count,
    // from the offset; otherwise the backward op's defaults (all channels)
    const bool narrow = has_residual && residual_channel_offset >= 0;
    ctx->saved_data["residual_channels"] = narrow ? residual->size(1) : int64_t(-1);
    ctx->saved_data["residual_offset"] = std::max<int64_t>(residual_channel_offset, 0);
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["bias_dtype"] = static_cast<int64_t>(has_bias ? bias->scalar_type() : at::kFloat);
    ctx->save_for_backward({x, relu ? out : at::Tensor(), has_weight ? *weight : at::Tensor(), mean, invstd});
    ctx->mark_non_differentiable({mean, invstd, var});
    return {out, mean, invstd, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& out = saved[1].defined() ? saved[1] : x;  // unread without ReLU
    const at::Tensor& weight = saved[2];
    const auto edge_needs = [&](const char* key) {
      const int64_t e = ctx->saved_data[key].toInt();
      return e >= 0 && ctx->needs_input_grad(static_cast<size_t>(e));
    };
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_w = edge_needs("weight_edge");
    const bool need_b = edge_needs("bias_edge");
    const bool need_r = edge_needs("residual_edge");
    at::Tensor grad_out = grads[0];
    if (!grad_out.defined()) grad_out = at::zeros_like(x);
    auto [grad_x, grad_w, grad_b, grad_r] =
        call_bwd(grad_out, x, out, defined_or_none(weight), saved[3], saved[4],
                 ctx->saved_data["relu"].toBool(), need_r, ctx->saved_data["residual_channels"].toInt(),
                 ctx->saved_data["residual_offset"].toInt());
    return {
        need_x ? grad_x : at::Tensor(),
        need_w ? grad_w.to(weight.scalar_type()) : at::Tensor(),
        need_b ? grad_b.to(static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt())) : at::Tensor(),
        at::Tensor(),
        need_r ? grad_r : at::Tensor(),
        at::Tensor(),
        at::Tensor(),
    };
  }
};

FwdResult batch_norm_act_fwd_autograd(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                      const c10::optional<at::Tensor>& bias, double eps,
                                      const c10::optional<at::Tensor>& residual, bool relu,
                                      int64_t residual_channel_offset) {
  const variable_list r =
      BatchNormActFunction::apply(x, weight, bias, eps, residual, relu, residual_channel_offset);
  return {r[0], r[1], r[2], r[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, Autograd, m) {
  m.impl("batch_norm_act_fwd", &batch_norm_act_fwd_autograd);
}

}  // namespace resnet_fused
