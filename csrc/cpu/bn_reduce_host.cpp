// The CUDA train-mode BatchNorm reductions run on the host, for tests:
// csrc/bn_reduce.h's plan, per-thread work and merge tree executed thread by
// thread in the device's order (the merges of one tree level touch disjoint
// slots, so serial order gives the device's values). The CPU tests check
// with it the partition and arithmetic csrc/cuda/batch_norm_act.cu runs
// (tests/ops/test_bn_reduce.py). One thread; never on a model's path.
#include "bn_reduce_host.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <vector>

#include "../batch_norm_act_args.h"
#include "../bn_reduce.h"

namespace resnet_fused {
namespace cpu {
namespace {

using bn_reduce::kThreads;

template <class Red, int VEC, typename index_t>
void run_blocks(const Red& red, const bn_reduce::Plan& p, typename Red::State* partial, int64_t C, int64_t HW) {
  using State = typename Red::State;
  std::vector<State> shm(static_cast<size_t>(kThreads) * VEC);
  for (int64_t split = 0; split < p.splits; ++split) {
    const index_t begin = static_cast<index_t>(split * p.chunk);
    const index_t end = static_cast<index_t>(std::min<int64_t>(split * p.chunk + p.chunk, p.work));
    for (int64_t tile = 0; tile < p.tiles; ++tile) {
      if (!p.channels_last) {
        const index_t c = static_cast<index_t>(tile);
        for (int t = 0; t < kThreads; ++t)
          shm[t] = bn_reduce::nchw_thread<Red, VEC, index_t>(red, c, static_cast<index_t>(C),
                                                             static_cast<index_t>(HW), begin, end, t);
        for (int stride = kThreads / 2; stride > 0; stride >>= 1)
          for (int t = 0; t < kThreads; ++t) bn_reduce::tree_level(shm.data(), t, stride, 1);
        partial[split * C + c] = shm[0];
        continue;
      }
      const int TX = p.tx, TY = p.ty;
      for (int ty = 0; ty < TY; ++ty) {
        for (int tx = 0; tx < TX; ++tx) {
          const index_t c0 = static_cast<index_t>((tile * TX + tx) * VEC);
          State* mine = shm.data() + (ty * TX + tx) * VEC;
          if (c0 < C) {
            const auto s = bn_reduce::nhwc_thread<Red, VEC, index_t>(red, c0, static_cast<index_t>(C), begin, end,
                                                                     ty, TY);
            for (int k = 0; k < VEC; ++k) mine[k] = Red::template lane<VEC>(s, k);
          } else {
            for (int k = 0; k < VEC; ++k) mine[k] = Red::zero();
          }
        }
      }
      for (int stride = TY / 2; stride > 0; stride >>= 1)
        for (int tx = 0; tx < TX; ++tx)
          for (int k = 0; k < VEC; ++k)
            for (int ty = 0; ty < TY; ++ty) bn_reduce::tree_level(shm.data() + tx * VEC + k, ty, stride, TX * VEC);
      for (int tx = 0; tx < TX; ++tx) {
        const int64_t c0 = (tile * TX + tx) * VEC;
        if (c0 < C)
          for (int k = 0; k < VEC; ++k) partial[split * C + c0 + k] = shm[tx * VEC + k];
      }
    }
  }
}

template <typename scalar_t, class Red>
std::vector<typename Red::State> reduce(const Red& red, bn_reduce::Plan& p, int64_t C, int64_t HW) {
  std::vector<typename Red::State> partial(static_cast<size_t>(p.splits * C));
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (p.vec == kVec) {
    if (p.wide_index) run_blocks<Red, kVec, int64_t>(red, p, partial.data(), C, HW);
    else run_blocks<Red, kVec, int32_t>(red, p, partial.data(), C, HW);
  } else {
    if (p.wide_index) run_blocks<Red, 1, int64_t>(red, p, partial.data(), C, HW);
    else run_blocks<Red, 1, int32_t>(red, p, partial.data(), C, HW);
  }
  return partial;
}

// The finalize warp's merge (csrc/cuda/batch_norm_act.cu merge_splits_warp).
template <class State>
State merge_splits(const std::vector<State>& partial, int64_t splits, int64_t C, int64_t c) {
  State lanes[bn_reduce::kFinalLanes];
  for (int l = 0; l < bn_reduce::kFinalLanes; ++l) lanes[l] = bn_reduce::split_lane(partial.data(), splits, C, c, l);
  for (int stride = bn_reduce::kFinalLanes / 2; stride > 0; stride >>= 1)
    for (int l = 0; l < bn_reduce::kFinalLanes; ++l) bn_reduce::tree_level(lanes, l, stride, 1);
  return lanes[0];
}

bool aligned16(const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; }

}  // namespace

BnReduceOnHost bn_reduce_on_host(bool grads, const at::Tensor& x, const at::Tensor& grad_out,
                                 const at::Tensor& out, const at::Tensor& mean, const at::Tensor& invstd,
                                 bool relu, int64_t sm_count, bool wide_index) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu(), "bn_reduce_on_host: x must be a 4-D CPU tensor");
  const at::MemoryFormat fmt = kernel_layout(x);
  TORCH_CHECK(x.is_contiguous(fmt), "bn_reduce_on_host: x must be contiguous in its layout (it is not copied: "
              "its alignment is what the test chose)");
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  TORCH_CHECK(x.numel() > 0, "bn_reduce_on_host: x must not be empty");
  const auto acc = acc_dtype(x);
  at::Tensor a = at::empty({C}, x.options().dtype(acc)), b = at::empty({C}, x.options().dtype(acc));
  BnReduceOnHost result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_reduce_on_host", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    bool aligned = aligned16(xp);
    if (grads) {
      for (const at::Tensor* t : {&grad_out, &out}) {
        TORCH_CHECK(t->sizes() == x.sizes() && t->strides() == x.strides() && t->scalar_type() == x.scalar_type(),
                    "bn_reduce_on_host: grad_out and out must have x's shape, strides and dtype");
        aligned = aligned && aligned16(t->const_data_ptr());
      }
      TORCH_CHECK(mean.numel() == C && invstd.numel() == C && mean.scalar_type() == acc &&
                  invstd.scalar_type() == acc, "bn_reduce_on_host: mean and invstd must be C values of the acc dtype");
    }
    bn_reduce::Plan p = bn_reduce::make_plan(cl, N, C, HW, sizeof(scalar_t), aligned, static_cast<int>(sm_count));
    p.wide_index = p.wide_index || wide_index;
    acc_t* ap = a.data_ptr<acc_t>();
    acc_t* bp = b.data_ptr<acc_t>();
    if (!grads) {
      const auto partial = reduce<scalar_t>(bn_reduce::Stats<scalar_t, acc_t>{xp}, p, C, HW);
      std::vector<acc_t> invstd_out(C);
      for (int64_t c = 0; c < C; ++c)
        bn_reduce::finalize_stats<acc_t>(merge_splits(partial, p.splits, C, c), c, acc_t(0), nullptr, ap, bp,
                                         invstd_out.data(), nullptr);
    } else {
      const bn_reduce::Grads<scalar_t, acc_t> red{grad_out.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(),
                                                  xp, mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
                                                  relu};
      const auto partial = reduce<scalar_t>(red, p, C, HW);
      for (int64_t c = 0; c < C; ++c) {
        const auto s = merge_splits(partial, p.splits, C, c);
        ap[c] = s.dz;
        bp[c] = s.dz_xhat;
      }
    }
    result.plan = {p.vec, p.tx, p.ty, p.tiles, p.splits, p.chunk, p.wide_index};
  });
  result.a = a;
  result.b = b;
  return result;
}

}  // namespace cpu
}  // namespace resnet_fused
