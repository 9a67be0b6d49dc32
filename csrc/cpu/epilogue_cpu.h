// The CPU epilogue pass, used by scale_shift_add_relu_ (in place) and by the
// batch_norm_act forward (x -> out).
#pragma once

#include <ATen/OpMathType.h>

#include "../epilogue.h"
#include "loops.h"

namespace resnet_fused {
namespace cpu {

// out = act((in - center[c]) * scale[c] + shift[c] + residual); out may be
// in; center may be null (no centring: the inference epilogue). Parameters
// in acc_type<scalar_t>.
template <typename scalar_t>
void scale_shift_add_act(const scalar_t* in, scalar_t* out, const scalar_t* residual,
                         const acc_type<scalar_t>* center, const acc_type<scalar_t>* scale,
                         const acc_type<scalar_t>* shift, bool channels_last, int64_t N, int64_t C,
                         int64_t HW, bool relu) {
  using acc_t = acc_type<scalar_t>;
  for_each_channel_run(
      channels_last, N, C, HW,
      [&](int64_t c, int64_t begin, int64_t end) {
        run_epilogue<scalar_t>(in + begin, out + begin, residual ? residual + begin : nullptr, end - begin,
                               center ? center[c] : acc_t(0), scale[c], shift[c], relu);
      },
      [&](int64_t row_begin, int64_t row_end) {
        const int64_t base = row_begin * C;
        rows_epilogue<scalar_t>(in + base, out + base, residual ? residual + base : nullptr,
                                row_end - row_begin, C, center, scale, shift, relu);
      });
}

// A residual read in place through its strides: r(n, c, h, w) =
// ptr[n*s_n + (c - c0)*s_c + h*s_h + w*s_w] for c in [c0, c0 + channels),
// zero for the other channels.
template <typename scalar_t>
struct StridedResidual {
  const scalar_t* ptr;
  int64_t s_n, s_c, s_h, s_w;
  int64_t c0, channels;
};

// out = act((in - center[c]) * scale[c] + shift[c] + r), r a StridedResidual
// (a stride-2 view of the block input, a narrower tensor for a zero-padded
// shortcut, or a residual in the other layout), so no copy of it is made.
// out may be in; center may be null. Same per-element arithmetic as
// scale_shift_add_act.
template <typename scalar_t, typename param_t>
void scale_shift_add_act_strided(const scalar_t* in, scalar_t* out, const StridedResidual<scalar_t>& r,
                                 const param_t* center, const param_t* scale, const param_t* shift,
                                 bool channels_last, int64_t N, int64_t C, int64_t H, int64_t W,
                                 bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HW = H * W;
  const int64_t c1 = r.c0 + r.channels;
  for_each_channel_run(
      channels_last, N, C, HW,
      [&](int64_t c, int64_t begin, int64_t /*end*/) {
        const int64_t n = begin / (C * HW);
        const acc_t m = center ? static_cast<acc_t>(center[c]) : acc_t(0);
        const acc_t s = static_cast<acc_t>(scale[c]);
        const acc_t b = static_cast<acc_t>(shift[c]);
        const scalar_t* src = in + begin;
        scalar_t* dst = out + begin;
        if (c < r.c0 || c >= c1) {
          for (int64_t i = 0; i < HW; ++i)
            dst[i] = static_cast<scalar_t>(resnet_fused::scale_shift_add_act<acc_t>(
                static_cast<acc_t>(src[i]) - m, s, b, acc_t(0), relu));
          return;
        }
        const scalar_t* rp = r.ptr + n * r.s_n + (c - r.c0) * r.s_c;
        for (int64_t h = 0; h < H; ++h) {
          const scalar_t* rrow = rp + h * r.s_h;
          for (int64_t w = 0; w < W; ++w)
            dst[h * W + w] = static_cast<scalar_t>(resnet_fused::scale_shift_add_act<acc_t>(
                static_cast<acc_t>(src[h * W + w]) - m, s, b, static_cast<acc_t>(rrow[w * r.s_w]), relu));
        }
      },
      [&](int64_t row_begin, int64_t row_end) {
        for (int64_t pixel = row_begin; pixel < row_end; ++pixel) {
          const int64_t base = pixel * C;
          const int64_t n = pixel / HW, l = pixel % HW;
          const scalar_t* rp = r.ptr + n * r.s_n + (l / W) * r.s_h + (l % W) * r.s_w;
          for (int64_t c = 0; c < C; ++c) {
            const acc_t res = (c >= r.c0 && c < c1) ? static_cast<acc_t>(rp[(c - r.c0) * r.s_c]) : acc_t(0);
            const acc_t m = center ? static_cast<acc_t>(center[c]) : acc_t(0);
            out[base + c] = static_cast<scalar_t>(resnet_fused::scale_shift_add_act<acc_t>(
                static_cast<acc_t>(in[base + c]) - m, static_cast<acc_t>(scale[c]),
                static_cast<acc_t>(shift[c]), res, relu));
          }
        }
      });
}

}  // namespace cpu
}  // namespace resnet_fused
