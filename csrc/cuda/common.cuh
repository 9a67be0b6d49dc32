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

constexpr int kElementwiseThreads = 256;

// Grid of a grid-stride element-wise kernel: enough blocks for every pack
// (a partial pack: the tail's threads), at most 32 per SM.
inline int64_t elementwise_blocks(int64_t numel, int vec) {
  const int64_t packs = numel / vec + (numel % vec != 0);
  return std::max<int64_t>(1, std::min<int64_t>((packs + kElementwiseThreads - 1) / kElementwiseThreads,
                                                static_cast<int64_t>(sm_count()) * 32));
}

// Whether an element-wise kernel's indices (and its grid-stride loop, which
// steps past numel by less than a grid) need int64: 32-bit division costs a
// fraction of the 64-bit subroutine.
inline bool needs_wide_index(int64_t numel) {
  return numel >= (int64_t(1) << 31) - int64_t(sm_count()) * 32 * kElementwiseThreads * 16;
}

// The 16-byte pack shapes: channels_last rows hold whole packs (C % VEC ==
// 0); NCHW packs straddle at most one plane boundary (HW >= VEC).
inline bool vector_shape_ok(bool channels_last, int64_t C, int64_t HW, int vec) {
  return channels_last ? C % vec == 0 : HW >= vec;
}

// The channel of each element k of the pack starting at element i:
// channels_last c0 + k; NCHW c0 up to the plane's end, then the next
// channel (HW >= VEC: at most one boundary), from one division per pack.
template <bool CHANNELS_LAST, typename index_t>
struct PackChannels {
  index_t c0, c1, first_of_c1;
  __device__ PackChannels(index_t i, index_t C, index_t HW) {
    if (CHANNELS_LAST) {
      c0 = i % C;
      c1 = c0;
      first_of_c1 = 0;
    } else {
      const index_t plane = i / HW;
      c0 = plane % C;
      c1 = c0 + 1 == C ? 0 : c0 + 1;
      first_of_c1 = (plane + 1) * HW - i;  // pack offset where the next plane starts
    }
  }
  __device__ index_t operator()(int k) const {
    return CHANNELS_LAST ? c0 + k : (k < first_of_c1 ? c0 : c1);
  }
};

// out = act((in - center[c]) * scale[c] + shift[c] + residual) (center may
// be null: the inference epilogue), VEC consecutive elements per thread with
// one 16-byte load/store each (vector_shape_ok), grid-stride over the whole
// tensor; elements past the last whole pack are done one each. index_t is
// int64 only where numel needs it (a 2,612 x 256x56x56 batch passes 2^31).
// scale and shift may live in shared memory (bn_eval_epilogue_kernel).
template <typename scalar_t, typename param_t, int VEC, bool CHANNELS_LAST, bool HAS_RESIDUAL, typename index_t>
__device__ __forceinline__ void epilogue_loop(const scalar_t* in, scalar_t* out, const scalar_t* __restrict__ residual,
                                              const param_t* __restrict__ center, const param_t* scale,
                                              const param_t* shift, index_t numel, index_t C, index_t HW,
                                              bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t packs = numel / VEC;
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t p = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs; p += stride) {
    Pack<scalar_t, VEC> v = reinterpret_cast<const Pack<scalar_t, VEC>*>(in)[p];
    Pack<scalar_t, VEC> r;
    if (HAS_RESIDUAL) r = reinterpret_cast<const Pack<scalar_t, VEC>*>(residual)[p];
    const PackChannels<CHANNELS_LAST, index_t> ch(p * VEC, C, HW);
RF_UNROLL
    for (int k = 0; k < VEC; ++k) {
      const index_t c = ch(k);
      const acc_t res = HAS_RESIDUAL ? static_cast<acc_t>(r.v[k]) : acc_t(0);
      const acc_t m = center ? static_cast<acc_t>(center[c]) : acc_t(0);
      v.v[k] = static_cast<scalar_t>(scale_shift_add_act<acc_t>(
          static_cast<acc_t>(v.v[k]) - m, static_cast<acc_t>(scale[c]),
          static_cast<acc_t>(shift[c]), res, relu));
    }
    reinterpret_cast<Pack<scalar_t, VEC>*>(out)[p] = v;
  }
  // the tail (NCHW with numel % VEC != 0): one element each
  for (index_t i = packs * VEC + static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    const index_t c = CHANNELS_LAST ? i % C : (i / HW) % C;
    const acc_t res = HAS_RESIDUAL ? static_cast<acc_t>(residual[i]) : acc_t(0);
    const acc_t m = center ? static_cast<acc_t>(center[c]) : acc_t(0);
    out[i] = static_cast<scalar_t>(scale_shift_add_act<acc_t>(static_cast<acc_t>(in[i]) - m,
                                                              static_cast<acc_t>(scale[c]),
                                                              static_cast<acc_t>(shift[c]), res, relu));
  }
}

template <typename scalar_t, typename param_t, int VEC, bool CHANNELS_LAST, bool HAS_RESIDUAL, typename index_t>
__global__ void scale_shift_add_act_kernel(const scalar_t* in, scalar_t* out,
                                           const scalar_t* __restrict__ residual,
                                           const param_t* __restrict__ center,
                                           const param_t* __restrict__ scale,
                                           const param_t* __restrict__ shift, index_t numel,
                                           index_t C, index_t HW, bool relu) {
  epilogue_loop<scalar_t, param_t, VEC, CHANNELS_LAST, HAS_RESIDUAL, index_t>(in, out, residual, center, scale,
                                                                             shift, numel, C, HW, relu);
}

// Calls f.template operator()<VEC, CHANNELS_LAST, HAS_RESIDUAL, index_t>()
// for the variant an element-wise launch needs (the epilogues, the BN dx
// pass): the 16-byte path when the shape and the pointers allow it, 32-bit
// indices below 2^31 elements.
template <typename scalar_t, typename F>
void with_epilogue_variant(bool channels_last, bool aligned, bool has_residual, int64_t numel, int64_t C,
                           int64_t HW, F&& f) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool vec = aligned && vector_shape_ok(channels_last, C, HW, kVec);
  const bool wide = needs_wide_index(numel);
  auto by_index = [&]<int VEC, bool CL, bool R>() {
    if (wide) f.template operator()<VEC, CL, R, int64_t>();
    else f.template operator()<VEC, CL, R, int32_t>();
  };
  auto by_residual = [&]<int VEC, bool CL>() {
    if (has_residual) by_index.template operator()<VEC, CL, true>();
    else by_index.template operator()<VEC, CL, false>();
  };
  auto by_layout = [&]<int VEC>() {
    if (channels_last) by_residual.template operator()<VEC, true>();
    else by_residual.template operator()<VEC, false>();
  };
  if (vec) by_layout.template operator()<kVec>();
  else by_layout.template operator()<1>();
}

template <typename scalar_t, typename param_t>
void launch_epilogue(const scalar_t* in, scalar_t* out, const scalar_t* r, const param_t* m,
                     const param_t* s, const param_t* b, bool channels_last, int64_t numel, int64_t C, int64_t HW,
                     bool relu, cudaStream_t stream) {
  const bool aligned = aligned16(in) && aligned16(out) && (!r || aligned16(r));
  with_epilogue_variant<scalar_t>(channels_last, aligned, r != nullptr, numel, C, HW,
                                  [&]<int VEC, bool CL, bool R, typename index_t>() {
    scale_shift_add_act_kernel<scalar_t, param_t, VEC, CL, R, index_t>
        <<<elementwise_blocks(numel, VEC), kElementwiseThreads, 0, stream>>>(
            in, out, r, m, s, b, static_cast<index_t>(numel), static_cast<index_t>(C), static_cast<index_t>(HW),
            relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace resnet_fused
