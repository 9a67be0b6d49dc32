// Launch helpers and the element-wise epilogue kernel shared by the CUDA ops.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "../epilogue.h"

namespace resnet_fused {
namespace cuda {

inline int sm_count() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

// out = act((in - center[c]) * scale[c] + shift[c] + residual) (center may
// be null: the inference epilogue), VEC consecutive elements
// per thread with one 16-byte load/store each. channels_last: the launcher
// guarantees C % VEC == 0 (a pack never straddles a row). NCHW: a pack may
// straddle one plane boundary (HW >= VEC: 7x7 maps are 49 elements), so
// its channel is c0 or the next one, from one division per pack; elements
// past the last whole pack are done one each. Indices are int64: a
// 2,612 x 256x56x56 batch passes 2^31.
template <typename scalar_t, typename param_t, int VEC, bool CHANNELS_LAST, bool HAS_RESIDUAL>
__global__ void scale_shift_add_act_kernel(const scalar_t* in, scalar_t* out,
                                           const scalar_t* __restrict__ residual,
                                           const param_t* __restrict__ center,
                                           const param_t* __restrict__ scale,
                                           const param_t* __restrict__ shift, int64_t numel,
                                           int64_t C, int64_t HW, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t packs = numel / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs;
       p += stride) {
    const int64_t i = p * VEC;
    Pack<scalar_t, VEC> v = reinterpret_cast<const Pack<scalar_t, VEC>*>(in)[p];
    Pack<scalar_t, VEC> r;
    if (HAS_RESIDUAL) r = reinterpret_cast<const Pack<scalar_t, VEC>*>(residual)[p];
    const int64_t plane = CHANNELS_LAST ? 0 : i / HW;
    const int64_t c0 = CHANNELS_LAST ? i % C : plane % C;
    const int64_t plane_end = (plane + 1) * HW;  // NCHW: the first element of the next plane
    const int64_t c1 = c0 + 1 == C ? 0 : c0 + 1;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t c = CHANNELS_LAST ? c0 + k : (i + k < plane_end ? c0 : c1);
      const acc_t res = HAS_RESIDUAL ? static_cast<acc_t>(r.v[k]) : acc_t(0);
      const acc_t m = center ? static_cast<acc_t>(center[c]) : acc_t(0);
      v.v[k] = static_cast<scalar_t>(scale_shift_add_act<acc_t>(
          static_cast<acc_t>(v.v[k]) - m, static_cast<acc_t>(scale[c]),
          static_cast<acc_t>(shift[c]), res, relu));
    }
    reinterpret_cast<Pack<scalar_t, VEC>*>(out)[p] = v;
  }
  // the tail (NCHW with numel % VEC != 0): one element each
  for (int64_t i = packs * VEC + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    const int64_t c = CHANNELS_LAST ? i % C : (i / HW) % C;
    const acc_t res = HAS_RESIDUAL ? static_cast<acc_t>(residual[i]) : acc_t(0);
    const acc_t m = center ? static_cast<acc_t>(center[c]) : acc_t(0);
    out[i] = static_cast<scalar_t>(scale_shift_add_act<acc_t>(static_cast<acc_t>(in[i]) - m,
                                                              static_cast<acc_t>(scale[c]),
                                                              static_cast<acc_t>(shift[c]), res, relu));
  }
}

template <typename scalar_t, typename param_t, int VEC, bool CL>
void launch_epilogue_vec(const scalar_t* in, scalar_t* out, const scalar_t* r, const param_t* m,
                         const param_t* s, const param_t* b, int64_t numel, int64_t C, int64_t HW, bool relu,
                         cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t packs = numel / VEC + (numel % VEC != 0);  // a partial pack: the tail's threads
  const int64_t blocks =
      std::max<int64_t>(1, std::min<int64_t>((packs + kThreads - 1) / kThreads,
                                             static_cast<int64_t>(sm_count()) * 32));
  if (r) {
    scale_shift_add_act_kernel<scalar_t, param_t, VEC, CL, true>
        <<<blocks, kThreads, 0, stream>>>(in, out, r, m, s, b, numel, C, HW, relu);
  } else {
    scale_shift_add_act_kernel<scalar_t, param_t, VEC, CL, false>
        <<<blocks, kThreads, 0, stream>>>(in, out, r, m, s, b, numel, C, HW, relu);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Picks the 16-byte path when the shape and pointers allow it.
template <typename scalar_t, typename param_t>
void launch_epilogue(const scalar_t* in, scalar_t* out, const scalar_t* r, const param_t* m,
                     const param_t* s, const param_t* b, bool channels_last, int64_t numel, int64_t C, int64_t HW,
                     bool relu, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  // channels_last: whole packs per row; NCHW: at most one plane boundary per pack
  const bool shape_ok = channels_last ? C % kVec == 0 : HW >= kVec;
  const bool vec_ok = shape_ok && aligned16(in) && aligned16(out) && (!r || aligned16(r));
  if (vec_ok) {
    if (channels_last) launch_epilogue_vec<scalar_t, param_t, kVec, true>(in, out, r, m, s, b, numel, C, HW, relu, stream);
    else launch_epilogue_vec<scalar_t, param_t, kVec, false>(in, out, r, m, s, b, numel, C, HW, relu, stream);
  } else {
    if (channels_last) launch_epilogue_vec<scalar_t, param_t, 1, true>(in, out, r, m, s, b, numel, C, HW, relu, stream);
    else launch_epilogue_vec<scalar_t, param_t, 1, false>(in, out, r, m, s, b, numel, C, HW, relu, stream);
  }
}

}  // namespace cuda
}  // namespace resnet_fused
