// Work partition and per-thread arithmetic of the CUDA train-mode BatchNorm
// reductions (csrc/cuda/batch_norm_act.cu): statistics forward, (Σdz, Σdz·x̂)
// backward. Host-device code, so the CPU build runs the very same partition
// and arithmetic on the host (csrc/cpu/bn_reduce_host.cpp) and the CPU tests
// check it (tests/ops/test_bn_reduce.py): every element counted once, the
// vector path taken, the results against float64.
//
// Each thread reads 16 bytes per load (VEC = 16 / sizeof(scalar_t) elements)
// and folds a whole pack (NCHW) or a group of kRowGroup rows (channels_last)
// into its running state with one Chan merge, so the statistics cost one
// division per pack instead of one per element.
//
// NCHW: block (c, split) reduces channel c. Its work items are the aligned
//   packs overlapping each plane (n, c), numbered n·P + j with P the most
//   packs a plane of HW elements can overlap; a split takes a contiguous
//   range of items. A pack that straddles two planes is read by both
//   channels' blocks, each counting only its own elements: no alignment
//   condition on HW (7×7 planes read 13 packs of 4 for 49 floats). When
//   N·C·HW is not a multiple of VEC, the last pack reaches past the last
//   element, inside that element's 16-byte aligned segment (never into
//   another page or past the caching allocator's rounded block); the
//   lanes past the end are masked like any other plane's.
// channels_last: a thread owns VEC consecutive channels (C % VEC == 0) and
//   walks rows begin + ty, + TY, ...; a block is TX channel packs × TY rows
//   and a split a contiguous range of rows.
// Blocks merge their threads' states in a fixed tree (tree_level), and the
// finalize step merges the splits in order: the result depends only on the
// shape, the alignment and the GPU's SM count, never on timing.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "epilogue.h"

namespace resnet_fused {

namespace bn_reduce {

constexpr int kThreads = 256;       // threads per reduction block
constexpr int kRowGroup = 4;        // channels_last: rows folded per merge
constexpr int kBlocksPerSm = 8;     // blocks aimed at per SM (latency hiding)
constexpr int kItemsPerThread = 1;  // fewest loads (row groups) per thread per split
constexpr int kFinalLanes = 32;     // finalize: lanes (one warp) merging one channel's splits

struct Plan {
  bool channels_last;
  int vec;           // elements per load: 16 bytes' worth, or 1
  int tx, ty;        // block shape (NCHW: kThreads x 1)
  int64_t tiles;     // grid.x: channels (NCHW) or channel-pack tiles (channels_last)
  int64_t splits;    // grid.y: partial results per channel
  int64_t work;      // NCHW: items per channel; channels_last: rows
  int64_t chunk;     // work items (rows) per split
  bool wide_index;   // indices need int64
};

// The most aligned VEC-packs a run of HW consecutive elements can overlap.
RF_HOST_DEVICE int64_t packs_per_plane(int64_t HW, int vec) { return (HW + vec - 2) / vec + 1; }

// The launch of a reduction over x [N, C, H·W = HW]; `aligned`: every tensor
// the reducer reads starts on a 16-byte boundary.
inline Plan make_plan(bool channels_last, int64_t N, int64_t C, int64_t HW, int elem_bytes,
                      bool aligned, int sm_count) {
  Plan p{};
  p.channels_last = channels_last;
  const int v16 = 16 / elem_bytes;
  // NCHW reads whole packs around each plane: worth it once a plane spans a
  // few (HW = 1 would read VEC times the data)
  const bool shape_ok = channels_last ? C % v16 == 0 : HW >= 2 * v16;
  p.vec = aligned && shape_ok && v16 > 1 ? v16 : 1;
  const int64_t target = static_cast<int64_t>(std::max(sm_count, 1)) * kBlocksPerSm;
  int64_t per_split_min;
  if (!channels_last) {
    p.tx = kThreads;
    p.ty = 1;
    p.tiles = C;
    p.work = N * packs_per_plane(HW, p.vec);
    per_split_min = static_cast<int64_t>(kThreads) * kItemsPerThread;
  } else {
    const int64_t cp = C / p.vec;
    int tx = 1;
    while (tx < cp && tx < 32) tx *= 2;
    p.tx = tx;
    p.ty = kThreads / tx;
    p.tiles = (cp + tx - 1) / tx;
    p.work = N * HW;
    per_split_min = static_cast<int64_t>(p.ty) * kRowGroup * kItemsPerThread;
  }
  const int64_t max_splits = std::max<int64_t>(1, std::min<int64_t>(p.work / per_split_min, 65535));
  p.splits = std::max<int64_t>(1, std::min<int64_t>((target + p.tiles - 1) / p.tiles, max_splits));
  p.chunk = (p.work + p.splits - 1) / p.splits;
  p.splits = (p.work + p.chunk - 1) / p.chunk;  // no empty split
  // element indices stay below N·C·HW; loop counters step past their end
  // by less than kThreads·kRowGroup
  const int64_t limit = (int64_t(1) << 31) - 2 * kThreads * kRowGroup;
  p.wide_index = N * C * HW >= limit || p.work >= limit;
  return p;
}

template <typename acc_t>
struct GradSums {
  acc_t dz;
  acc_t dz_xhat;
  RF_HOST_DEVICE void merge(const GradSums& o) {
    dz += o.dz;
    dz_xhat += o.dz_xhat;
  }
};

// Folds n values (a prefix or a mask of v) with sum `sum` into s: the chunk's
// own mean and M2 two-pass in registers, then one Chan merge. n == VEC
// divides by a power of two, exactly as a multiplication.
template <typename acc_t, int VEC>
RF_HOST_DEVICE void merge_chunk(Welford<acc_t>& s, const acc_t (&v)[VEC], const bool (&ok)[VEC], int n,
                                acc_t sum) {
  if (n == 0) return;
  const acc_t mean = n == VEC ? sum * (acc_t(1) / acc_t(VEC)) : sum / acc_t(n);
  acc_t m2 = acc_t(0);
RF_UNROLL
  for (int k = 0; k < VEC; ++k) {
    const acc_t d = ok[k] ? v[k] - mean : acc_t(0);
    m2 += d * d;
  }
  s.merge(Welford<acc_t>{mean, m2, acc_t(n)});
}

// Batch statistics of x.
template <typename scalar_t, typename acc_t>
struct Stats {
  using State = Welford<acc_t>;
  const scalar_t* x;

  static RF_HOST_DEVICE State zero() { return State{acc_t(0), acc_t(0), acc_t(0)}; }

  // NCHW: the elements of pack `pack` with indices in [lo, hi) (channel c's plane)
  template <int VEC, typename index_t>
  RF_HOST_DEVICE void add_pack(State& s, index_t, index_t pack, index_t lo, index_t hi) const {
    const Pack<scalar_t, VEC> p = reinterpret_cast<const Pack<scalar_t, VEC>*>(x)[pack];
    acc_t v[VEC];
    bool ok[VEC];
    acc_t sum = acc_t(0);
    int n = 0;
RF_UNROLL
    for (int k = 0; k < VEC; ++k) {
      const index_t e = pack * VEC + k;
      ok[k] = e >= lo && e < hi;
      v[k] = static_cast<acc_t>(p.v[k]);
      sum += ok[k] ? v[k] : acc_t(0);
      n += ok[k];
    }
    merge_chunk<acc_t, VEC>(s, v, ok, n, sum);
  }

  // channels_last: one state per channel of a thread's pack; the count is
  // the same for all of them, so the merge weight is one division per group
  template <int VEC>
  struct Lanes {
    acc_t mean[VEC];
    acc_t m2[VEC];
    acc_t count;
  };

  template <int VEC, typename index_t>
  RF_HOST_DEVICE Lanes<VEC> lanes(index_t) const {
    Lanes<VEC> s;
RF_UNROLL
    for (int k = 0; k < VEC; ++k) s.mean[k] = s.m2[k] = acc_t(0);
    s.count = acc_t(0);
    return s;
  }

  // the packs at[0..n) (n >= 1 rows of the same VEC channels)
  template <int VEC, int R, typename index_t>
  RF_HOST_DEVICE void add_rows(Lanes<VEC>& s, const index_t (&at)[R], int n) const {
    Pack<scalar_t, VEC> p[R];
RF_UNROLL
    for (int i = 0; i < R; ++i) p[i] = i < n ? reinterpret_cast<const Pack<scalar_t, VEC>*>(x)[at[i]] : Pack<scalar_t, VEC>{};
    const acc_t nb = acc_t(n);
    const acc_t total = s.count + nb;
    const acc_t w = nb / total;
RF_UNROLL
    for (int k = 0; k < VEC; ++k) {
      acc_t v[R];
      acc_t sum = acc_t(0);
RF_UNROLL
      for (int i = 0; i < R; ++i) {
        v[i] = i < n ? static_cast<acc_t>(p[i].v[k]) : acc_t(0);
        sum += v[i];
      }
      const acc_t mean_b = n == R ? sum * (acc_t(1) / acc_t(R)) : sum / nb;
      acc_t m2_b = acc_t(0);
RF_UNROLL
      for (int i = 0; i < R; ++i) {
        const acc_t d = i < n ? v[i] - mean_b : acc_t(0);
        m2_b += d * d;
      }
      // Chan's merge with the shared weight w = nb / total (Welford::merge);
      // from an empty state it yields the group's own mean and M2 (delta²·0
      // is NaN only where m2_b already is)
      const acc_t delta = mean_b - s.mean[k];
      s.mean[k] = s.count == acc_t(0) ? mean_b : Welford<acc_t>::merged_mean(s.mean[k], mean_b, delta, w);
      s.m2[k] += m2_b + delta * delta * s.count * w;
    }
    s.count = total;
  }

  template <int VEC>
  static RF_HOST_DEVICE State lane(const Lanes<VEC>& s, int k) {
    return s.count == acc_t(0) ? zero() : State{s.mean[k], s.m2[k], s.count};
  }
};

// The backward's per-channel sums Σdz and Σdz·x̂ (dz through the ReLU mask).
template <typename scalar_t, typename acc_t>
struct Grads {
  using State = GradSums<acc_t>;
  const scalar_t* grad_out;
  const scalar_t* out;
  const scalar_t* x;
  const acc_t* mean;
  const acc_t* invstd;
  bool relu;

  static RF_HOST_DEVICE State zero() { return State{acc_t(0), acc_t(0)}; }

  RF_HOST_DEVICE void add_one(acc_t& dz_sum, acc_t& dzx_sum, scalar_t g, scalar_t o, scalar_t xv, acc_t m,
                              acc_t is) const {
    const acc_t dz = relu_backward<acc_t>(static_cast<acc_t>(g), static_cast<acc_t>(o), relu);
    const acc_t xhat = (static_cast<acc_t>(xv) - m) * is;
    dz_sum += dz;
    dzx_sum += dz * xhat;
  }

  template <int VEC, typename index_t>
  RF_HOST_DEVICE void add_pack(State& s, index_t c, index_t pack, index_t lo, index_t hi) const {
    using P = Pack<scalar_t, VEC>;
    const P g = reinterpret_cast<const P*>(grad_out)[pack];
    const P o = reinterpret_cast<const P*>(out)[pack];
    const P xv = reinterpret_cast<const P*>(x)[pack];
    const acc_t m = mean[c], is = invstd[c];
RF_UNROLL
    for (int k = 0; k < VEC; ++k) {
      const index_t e = pack * VEC + k;
      if (e >= lo && e < hi) add_one(s.dz, s.dz_xhat, g.v[k], o.v[k], xv.v[k], m, is);
    }
  }

  template <int VEC>
  struct Lanes {
    acc_t dz[VEC];
    acc_t dz_xhat[VEC];
    acc_t mean[VEC];
    acc_t invstd[VEC];
  };

  template <int VEC, typename index_t>
  RF_HOST_DEVICE Lanes<VEC> lanes(index_t c0) const {
    Lanes<VEC> s;
RF_UNROLL
    for (int k = 0; k < VEC; ++k) {
      s.dz[k] = s.dz_xhat[k] = acc_t(0);
      s.mean[k] = mean[c0 + k];
      s.invstd[k] = invstd[c0 + k];
    }
    return s;
  }

  template <int VEC, int R, typename index_t>
  RF_HOST_DEVICE void add_rows(Lanes<VEC>& s, const index_t (&at)[R], int n) const {
    using P = Pack<scalar_t, VEC>;
RF_UNROLL
    for (int i = 0; i < R; ++i) {
      if (i >= n) break;
      const P g = reinterpret_cast<const P*>(grad_out)[at[i]];
      const P o = reinterpret_cast<const P*>(out)[at[i]];
      const P xv = reinterpret_cast<const P*>(x)[at[i]];
RF_UNROLL
      for (int k = 0; k < VEC; ++k) add_one(s.dz[k], s.dz_xhat[k], g.v[k], o.v[k], xv.v[k], s.mean[k], s.invstd[k]);
    }
  }

  template <int VEC>
  static RF_HOST_DEVICE State lane(const Lanes<VEC>& s, int k) {
    return State{s.dz[k], s.dz_xhat[k]};
  }
};

// NCHW: thread `tid`'s state over the work items [begin, end) of channel c.
template <class Red, int VEC, typename index_t>
RF_HOST_DEVICE typename Red::State nchw_thread(const Red& red, index_t c, index_t C, index_t HW, index_t begin,
                                               index_t end, int tid) {
  const index_t P = static_cast<index_t>(packs_per_plane(HW, VEC));
  typename Red::State s = Red::zero();
  for (index_t w = begin + tid; w < end; w += kThreads) {
    const index_t n = w / P;
    const index_t lo = (n * C + c) * HW;
    const index_t pack = lo / VEC + (w - n * P);
    if (pack * VEC < lo + HW) red.template add_pack<VEC, index_t>(s, c, pack, lo, lo + HW);
  }
  return s;
}

// channels_last: the thread at row offset ty (of ty_count) over rows
// [begin, end) for channels c0 .. c0 + VEC.
template <class Red, int VEC, typename index_t>
RF_HOST_DEVICE typename Red::template Lanes<VEC> nhwc_thread(const Red& red, index_t c0, index_t C,
                                                             index_t begin, index_t end, int ty,
                                                             int ty_count) {
  auto s = red.template lanes<VEC, index_t>(c0);
  for (index_t r = begin + ty; r < end; r += kRowGroup * ty_count) {
    index_t at[kRowGroup];
    int n = 0;
RF_UNROLL
    for (int i = 0; i < kRowGroup; ++i) {
      const index_t row = r + i * ty_count;
      const bool in = row < end;
      at[i] = in ? (row * C + c0) / VEC : index_t(0);
      n += in;
    }
    red.template add_rows<VEC, kRowGroup, index_t>(s, at, n);
  }
  return s;
}

// One level of the block's merge tree: slot t takes slot t + stride, for
// stride = count/2, count/4, ..., 1 (count a power of two). `lane_stride`
// spaces the slots (channels_last merges along rows).
template <class State>
RF_HOST_DEVICE void tree_level(State* slots, int t, int stride, int lane_stride) {
  if (t < stride) slots[t * lane_stride].merge(slots[(t + stride) * lane_stride]);
}

// Finalize, one warp per channel: lane l merges splits l, l + 32, ... in
// order, then the lanes merge in a tree (tree_level, stride 16 ... 1), so a
// thousand splits cost a chain of 33 merges, not a thousand.
template <class State>
RF_HOST_DEVICE State split_lane(const State* partial, int64_t splits, int64_t C, int64_t c, int lane) {
  State s{};
  for (int64_t k = lane; k < splits; k += kFinalLanes) s.merge(partial[k * C + c]);
  return s;
}

// Channel c's statistics from its merged state.
template <typename acc_t>
RF_HOST_DEVICE void finalize_stats(const Welford<acc_t>& s, int64_t c, acc_t eps, const acc_t* weight, acc_t* mean,
                                   acc_t* var, acc_t* invstd, acc_t* scale) {
  using std::sqrt;
  const acc_t v = s.m2 / s.count;
  mean[c] = s.mean;
  var[c] = v;
  const acc_t is = acc_t(1) / sqrt(v + eps);
  invstd[c] = is;
  if (scale) scale[c] = weight[c] * is;
}

}  // namespace bn_reduce
}  // namespace resnet_fused
