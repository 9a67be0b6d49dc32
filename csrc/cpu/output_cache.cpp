// The cache of output_cache.h: an at::Allocator whose blocks of kMinBytes or
// more go back to a list of free blocks when their tensor dies, and are
// handed out again for a request of the same byte size.
#include "output_cache.h"

#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <iterator>
#include <list>
#include <mutex>

namespace resnet_fused {
namespace cpu {
namespace {

constexpr size_t kMinBytes = size_t(1) << 20;
constexpr size_t kMaxCachedBytes = size_t(256) << 20;

struct Block {
  void* data;
  size_t bytes;
};

class Cache {
 public:
  // the most recently freed block of `bytes` (the likeliest still in
  // cache), or null
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = free_.rbegin(); it != free_.rend(); ++it)
      if (it->bytes == bytes) {
        void* data = it->data;
        held_ -= bytes;
        free_.erase(std::next(it).base());
        return data;
      }
    return nullptr;
  }
  // keep `b` for reuse, freeing the oldest blocks beyond the bound
  void give(Block b) {
    std::list<Block> dropped;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (b.bytes > kMaxCachedBytes) {
        dropped.push_back(b);
      } else {
        free_.push_back(b);
        held_ += b.bytes;
        while (held_ > kMaxCachedBytes) {
          held_ -= free_.front().bytes;
          dropped.splice(dropped.end(), free_, free_.begin());
        }
      }
    }
    for (const Block& d : dropped) c10::free_cpu(d.data);
  }
  size_t held() {
    std::lock_guard<std::mutex> lock(mu_);
    return held_;
  }

 private:
  std::mutex mu_;
  std::list<Block> free_;  // oldest first
  size_t held_ = 0;
};

Cache& cache() {
  static Cache* c = new Cache;  // never destroyed: tensors may die after static destructors ran
  return *c;
}

void give_back(void* ctx) {
  Block* b = static_cast<Block*>(ctx);
  cache().give(*b);
  delete b;
}

class CachingAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes) return c10::GetCPUAllocator()->allocate(n);
    void* data = cache().take(n);
    if (!data) data = c10::alloc_cpu(n);
    return {data, new Block{data, n}, &give_back, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format) {
  static CachingAllocator allocator;
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), format);
}

size_t output_cache_bytes() { return cache().held(); }

}  // namespace cpu
}  // namespace resnet_fused
