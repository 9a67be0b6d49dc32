// The CPU epilogue pass, used by scale_shift_add_relu_ (in place) and by the
// batch_norm_act forward (x -> out).
#pragma once

#include <ATen/OpMathType.h>

#include "../epilogue.h"
#include "loops.h"

namespace resnet_fused {
namespace cpu {

// out = act((in - center[c]) * scale[c] + shift[c] + residual); out may be
// in; center may be null (no centring: the inference epilogue).
template <typename scalar_t, typename param_t>
void scale_shift_add_act(const scalar_t* in, scalar_t* out, const scalar_t* residual,
                         const param_t* center, const param_t* scale, const param_t* shift,
                         bool channels_last, int64_t N, int64_t C, int64_t HW, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  for_each_channel_run(
      channels_last, N, C, HW,
      [&](int64_t c, int64_t begin, int64_t end) {
        const acc_t m = center ? static_cast<acc_t>(center[c]) : acc_t(0);
        const acc_t s = static_cast<acc_t>(scale[c]);
        const acc_t b = static_cast<acc_t>(shift[c]);
        for (int64_t i = begin; i < end; ++i) {
          const acc_t r = residual ? static_cast<acc_t>(residual[i]) : acc_t(0);
          out[i] = static_cast<scalar_t>(
              resnet_fused::scale_shift_add_act<acc_t>(static_cast<acc_t>(in[i]) - m, s, b, r, relu));
        }
      },
      [&](int64_t base) {
        for (int64_t c = 0; c < C; ++c) {
          const acc_t r = residual ? static_cast<acc_t>(residual[base + c]) : acc_t(0);
          const acc_t m = center ? static_cast<acc_t>(center[c]) : acc_t(0);
          out[base + c] = static_cast<scalar_t>(resnet_fused::scale_shift_add_act<acc_t>(
              static_cast<acc_t>(in[base + c]) - m, static_cast<acc_t>(scale[c]),
              static_cast<acc_t>(shift[c]), r, relu));
        }
      });
}

}  // namespace cpu
}  // namespace resnet_fused
