// bn_reduce_on_host: the CUDA BatchNorm reductions (csrc/bn_reduce.h) run
// on the host for the CPU tests; exposed as resnet_fused._C.bn_reduce_on_host.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace resnet_fused {
namespace cpu {

struct BnReduceOnHost {
  at::Tensor a, b;  // stats: (mean, biased var); grads: (Σdz, Σdz·x̂)
  struct {
    int64_t vec, tx, ty, tiles, splits, chunk;
    bool wide_index;
  } plan;
};

BnReduceOnHost bn_reduce_on_host(bool grads, const at::Tensor& x, const at::Tensor& grad_out,
                                 const at::Tensor& out, const at::Tensor& mean, const at::Tensor& invstd,
                                 bool relu, int64_t sm_count, bool wide_index);

}  // namespace cpu
}  // namespace resnet_fused
