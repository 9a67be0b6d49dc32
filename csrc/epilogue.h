// Per-element math of the fused epilogues, written once for every device.
//
// The CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda) both call these
// functions, so the CPU tests exercise the arithmetic the GPU runs.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RF_HOST_DEVICE inline
#endif

namespace resnet_fused {

// ReLU that propagates NaN like torch.relu (fmax(NaN, 0) would return 0 and
// hide a NaN from the tests).
template <typename acc_t>
RF_HOST_DEVICE acc_t relu_keep_nan(acc_t v) {
  return v < acc_t(0) ? acc_t(0) : v;
}

// y = act(v * scale + shift + residual), evaluated in acc_t (fp32 for every
// storage type but double). Two roundings (multiply, then add) match the eager
// reference `y * scale + shift` exactly instead of using a fused multiply-add.
template <typename acc_t>
RF_HOST_DEVICE acc_t scale_shift_add_act(acc_t v, acc_t scale, acc_t shift,
                                         acc_t residual, bool relu) {
  acc_t out = v * scale;
  out = out + shift;
  out = out + residual;
  return relu ? relu_keep_nan(out) : out;
}

}  // namespace resnet_fused
