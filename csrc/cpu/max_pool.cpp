// CPU kernel of resnet_fused::max_pool2d: inference max pooling without the
// int64 indices ATen's max_pool2d computes (and then drops) on the way. On a
// channels_last tensor each output pixel's C channels are the element-wise
// max of the window's input rows (kernels.h pool_max_rows), so the loop is
// contiguous and vectorised; other layouts go to ATen's max_pool2d. Results
// are bitwise ATen's: same window order, same NaN and tie rule (a NaN's
// payload aside: ATen's vectorised bf16 path rewrites it).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <string>
#include <vector>

#include "kernels.h"
#include "output_cache.h"

namespace resnet_fused {
namespace {

std::string ints(at::IntArrayRef v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

// ATen's pooling_output_shape: floor or ceil; with ceil_mode the last window
// must start inside the input or its left padding.
int64_t pooled_size(int64_t in, int64_t k, int64_t pad, int64_t stride, int64_t dil, bool ceil_mode) {
  const int64_t span = in + 2 * pad - dil * (k - 1) - 1 + (ceil_mode ? stride - 1 : 0);
  int64_t out = (span >= 0 ? span / stride : -((-span + stride - 1) / stride)) + 1;
  if (ceil_mode && (out - 1) * stride >= in + pad) --out;
  return out;
}

// Arguments as F.max_pool2d takes them after its own normalisation: two
// values each (the Python wrapper expands ints and an empty stride).
void check_pool_args(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation) {
  const char* prefix = "max_pool2d: ";
  TORCH_CHECK(x.dim() == 4, prefix, "x must be a 4-D (N, C, H, W) tensor, got ", x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), prefix,
              "x must be float32, float64, bfloat16 or float16, got ", x.scalar_type());
  const std::pair<const char*, at::IntArrayRef> args[] = {
      {"kernel_size", kernel_size}, {"stride", stride}, {"padding", padding}, {"dilation", dilation}};
  for (const auto& [name, v] : args) {
    TORCH_CHECK(v.size() == 2, prefix, name, " must have two values (height, width), got ", ints(v));
  }
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(kernel_size[i] > 0, prefix, "kernel_size must be positive, got ", ints(kernel_size));
    TORCH_CHECK(stride[i] > 0, prefix, "stride must be positive, got ", ints(stride));
    TORCH_CHECK(dilation[i] > 0, prefix, "dilation must be positive, got ", ints(dilation));
    TORCH_CHECK(padding[i] >= 0 && padding[i] <= ((kernel_size[i] - 1) * dilation[i] + 1) / 2, prefix,
                "padding must be between 0 and half the (dilated) kernel size, got padding ",
                ints(padding), " for kernel_size ", ints(kernel_size), " and dilation ", ints(dilation));
  }
}

at::Tensor max_pool2d_cpu(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  check_pool_args(x, kernel_size, stride, padding, dilation);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t OH = pooled_size(H, kernel_size[0], padding[0], stride[0], dilation[0], ceil_mode);
  const int64_t OW = pooled_size(W, kernel_size[1], padding[1], stride[1], dilation[1], ceil_mode);
  TORCH_CHECK(OH >= 1 && OW >= 1, "max_pool2d: the output would be empty (", OH, "x", OW,
              ") for an input of ", H, "x", W, " with kernel_size ", ints(kernel_size), ", stride ",
              ints(stride), ", padding ", ints(padding), " and dilation ", ints(dilation));
  // channels_last only where the strides say so unambiguously (C > 1 and a
  // spatial extent > 1); anything else is ATen's, layout and all
  if (!(C > 1 && H * W > 1 && x.is_contiguous(at::MemoryFormat::ChannelsLast))) {
    return at::max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode);
  }
  at::Tensor out = cpu::empty_output({N, C, OH, OW}, x.options(), at::MemoryFormat::ChannelsLast);
  if (out.numel() == 0) return out;
  const int64_t KH = kernel_size[0], KW = kernel_size[1];
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2d_cpu", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    // one task per output row (n, oh); about 32K output elements per grain
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(OW * C, 1));
    at::parallel_for(0, N * OH, grain, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> offsets(static_cast<size_t>(KH * KW));
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = r / OH, oh = r % OH;
        const int64_t ih0 = oh * stride[0] - padding[0];
        const scalar_t* image = in + n * H * W * C;
        scalar_t* dst = o + r * OW * C;
        // The window's input rows relative to the image, for output pixels
        // ow in [a, b): in window order, the rows and columns in bounds.
        // Pixels whose window lies inside the image columns share one
        // table (their windows differ by a shift of stride columns).
        const auto run = [&](int64_t a, int64_t b) {
          const int64_t iw0 = a * stride[1] - padding[1];
          int64_t count = 0;
          for (int64_t kh = 0; kh < KH; ++kh) {
            const int64_t ih = ih0 + kh * dilation[0];
            if (ih < 0 || ih >= H) continue;
            for (int64_t kw = 0; kw < KW; ++kw) {
              const int64_t iw = iw0 + kw * dilation[1];
              if (iw < 0 || iw >= W) continue;
              offsets[count++] = (ih * W + iw) * C;
            }
          }
          if (count == 0) {  // only with dilation can a window miss the input: ATen gives -inf
            std::fill(dst + a * C, dst + b * C, -std::numeric_limits<scalar_t>::infinity());
            return;
          }
          cpu::pool_max_rows<scalar_t>(image, stride[1] * C, offsets.data(), count, b - a, dst + a * C, C);
        };
        // [first, last): the pixels whose window's columns are all inside
        int64_t first = 0, last = OW;
        while (first < OW && first * stride[1] - padding[1] < 0) ++first;
        while (last > first && (last - 1) * stride[1] - padding[1] + (KW - 1) * dilation[1] >= W) --last;
        for (int64_t ow = 0; ow < first; ++ow) run(ow, ow + 1);
        if (first < last) run(first, last);
        for (int64_t ow = std::max(first, last); ow < OW; ++ow) run(ow, ow + 1);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("max_pool2d", &max_pool2d_cpu);
}

}  // namespace resnet_fused
