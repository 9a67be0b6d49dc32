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

// #pragma unroll for the device compiler only (the host compiler warns on it)
#if defined(__CUDACC__) || defined(__HIPCC__)
#define RF_UNROLL _Pragma("unroll")
#else
#define RF_UNROLL
#endif

#include <cmath>

namespace resnet_fused {

// VEC elements moved by one load or store (16 bytes for VEC = 16 / sizeof).
template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

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

// An eval-mode BatchNorm over a convolution's output without its bias as
// (scale, shift), in resnet_fused/ops/fold.py `scale_shift`'s order:
//   scale = γ · (1 / sqrt(var + eps)),  shift = β − mean·scale (+ bias·scale)
// gamma/beta/bias may be null (absent). Every step rounds once, correctly
// (the CPU build has -ffp-contract=off; the device uses the _rn intrinsics,
// no fused multiply-add), so both devices give torch's CPU bits.
RF_HOST_DEVICE void bn_scale_shift(float var, float mean, const float* gamma, const float* beta,
                                   const float* bias, float eps, float& scale, float& shift) {
#if defined(__CUDA_ARCH__)
  scale = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(var, eps)));
  if (gamma) scale = __fmul_rn(*gamma, scale);
  shift = __fmul_rn(-mean, scale);
  if (beta) shift = __fadd_rn(*beta, shift);
  if (bias) shift = __fadd_rn(shift, __fmul_rn(*bias, scale));
#else
  scale = 1.0f / std::sqrt(var + eps);
  if (gamma) scale = *gamma * scale;
  shift = -mean * scale;
  if (beta) shift = *beta + shift;
  if (bias) shift = shift + *bias * scale;
#endif
}

}  // namespace resnet_fused

namespace resnet_fused {

// ---- train-mode BatchNorm + residual + ReLU --------------------------------
//
// Forward: with batch mean m and invstd s per channel, the normalisation is
// the inference epilogue applied to the centred input:
//   out = scale_shift_add_act(x − m, γ·s, β, r)
// Centring first keeps full precision when |m| is large against the spread
// (x·γs + (β − m·γs) would cancel two large terms).
//
// Backward, with z = x̂·γ + β + r, out = act(z), x̂ = (x − m)·s and n
// elements per channel:
//   dz = act'(z)·dout         (ReLU: dout where out > 0, else 0)
//   dβ = Σ dz,   dγ = Σ dz·x̂,   dr = dz
//   dx = γ·s · (dz − Σdz/n − x̂·Σ(dz·x̂)/n)

// dz from the saved output: out > 0 exactly where z > 0. As torch's
// threshold_backward: 0 where out <= 0, so a NaN output passes its gradient.
template <typename acc_t>
RF_HOST_DEVICE acc_t relu_backward(acc_t grad_out, acc_t out, bool relu) {
  return (relu && out <= acc_t(0)) ? acc_t(0) : grad_out;
}

// dx given dz, x̂ and the per-channel means of dz and dz·x̂; k = γ·s.
template <typename acc_t>
RF_HOST_DEVICE acc_t bn_backward_dx(acc_t dz, acc_t xhat, acc_t mean_dz, acc_t mean_dz_xhat,
                                    acc_t k) {
  return (dz - mean_dz - xhat * mean_dz_xhat) * k;
}

// Welford/Chan running statistics: numerically stable mean and variance,
// mergeable in any fixed order (never E[x²] − E[x]²). A plain aggregate
// (start from {0, 0, 0}) so it can live in CUDA shared memory.
template <typename acc_t>
struct Welford {
  acc_t mean;
  acc_t m2;
  acc_t count;

  RF_HOST_DEVICE void add(acc_t x) {
    count += acc_t(1);
    const acc_t delta = x - mean;
    mean += delta / count;
    m2 += delta * (x - mean);
  }

  RF_HOST_DEVICE void merge(const Welford& o) {
    if (o.count == acc_t(0)) return;
    if (count == acc_t(0)) {
      *this = o;
      return;
    }
    const acc_t total = count + o.count;
    const acc_t delta = o.mean - mean;
    const acc_t w = o.count / total;
    mean = merged_mean(mean, o.mean, delta, w);
    m2 += o.m2 + delta * delta * count * w;
    count = total;
  }

  // mean + delta·w, the stable form; where delta is not finite (an inf among
  // the values) the weighted form, which gives what Σx/n gives: inf stays
  // inf (inf + (−inf)·w would be NaN), inf − inf and NaN give NaN. The
  // variance is NaN either way, as torch's is. (d − d == 0: d is finite.)
  static RF_HOST_DEVICE acc_t merged_mean(acc_t mean_a, acc_t mean_b, acc_t delta, acc_t w) {
    return delta - delta == acc_t(0) ? mean_a + delta * w : mean_a * (acc_t(1) - w) + mean_b * w;
  }
};

}  // namespace resnet_fused
