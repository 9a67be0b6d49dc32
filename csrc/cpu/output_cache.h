// Outputs of the CPU inference kernels (conv1x1.cpp, conv_gemm.cpp, winograd.cpp, grouped_conv.cpp,
// max_pool.cpp) from a small cache of freed blocks. glibc serves a block of
// at least its mmap threshold (which rises to the largest block freed so far,
// up to 32 MB) by a fresh mmap, so a batch-8 forward's 25 MB activations
// were new pages on every call: each first write a page fault (system time of
// 3-10% of a resnet50 batch-8 forward on a 2-core VM; docs/performance.md). A block of 1 MB or more that a
// tensor from here frees is kept for the next output of the same byte size
// (the most recently freed such block first: the likeliest still in cache);
// at most kMaxCachedBytes (256 MB) are kept, the oldest blocks freed first
// beyond that. Smaller blocks go to torch's CPU allocator as before.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>

namespace resnet_fused {
namespace cpu {

// at::empty(sizes, options.memory_format(format)) on the cache's allocator
// (a normal, resizable CPU tensor).
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format);

// Bytes held for reuse now (for tests and measurements).
size_t output_cache_bytes();

}  // namespace cpu
}  // namespace resnet_fused
