// fastsd::cpu::empty: huge-page backed output buffers (see alloc.h).
#include "alloc.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace fastsd {
namespace cpu {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
// glibc's largest mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX): smaller buffers
// come from its heap, recycled without page faults.
constexpr size_t kMinBytes = size_t(32) << 20;

bool huge_pages_enabled() {
  static const bool enabled = [] {
#ifdef __linux__
    const char* env = std::getenv("FASTSD_HUGEPAGES");
    return !(env && std::strcmp(env, "0") == 0);
#else
    return false;
#endif
  }();
  return enabled;
}

#ifdef __linux__
// Freed buffers are kept for reuse, up to kMaxCachedBlocks and kMaxCachedBytes (the oldest go
// first): a training loop allocates the same sizes every step, and a fresh mapping costs the
// kernel's zeroing of every huge page and, where memory is fragmented, a compaction stall (a
// first 60 MiB call took 80 ms here, later ones 4 ms). empty_cache() releases them.
constexpr size_t kMaxCachedBlocks = 8;
constexpr size_t kMaxCachedBytes = size_t(2) << 30;

struct Block {
  void* ptr;
  size_t capacity;  // whole huge pages
};

struct Cache {
  std::mutex mutex;
  std::vector<Block> blocks;  // oldest first
  size_t bytes = 0;
};

// Never destroyed: tensors may be freed after static destructors have run, at interpreter exit.
Cache& cache() {
  static Cache* const instance = new Cache();
  return *instance;
}

void release(const Block& block) { std::free(block.ptr); }

// The DataPtr's deleter: the context is the Block.
void free_huge(void* context) {
  Block* block = static_cast<Block*>(context);
  c10::profiledCPUMemoryReporter().Delete(block->ptr);
  std::vector<Block> evicted;
  {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mutex);
    c.blocks.push_back(*block);
    c.bytes += block->capacity;
    while (c.blocks.size() > kMaxCachedBlocks || c.bytes > kMaxCachedBytes) {
      evicted.push_back(c.blocks.front());
      c.bytes -= c.blocks.front().capacity;
      c.blocks.erase(c.blocks.begin());
    }
  }
  delete block;
  for (const Block& b : evicted) release(b);
}

// A cached block that fits nbytes with at most 1/8 to spare (the most recent first), or a new one.
Block take_block(size_t nbytes) {
  const size_t capacity = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
  {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mutex);
    for (size_t i = c.blocks.size(); i-- > 0;) {
      if (c.blocks[i].capacity >= capacity && c.blocks[i].capacity - capacity <= capacity / 8) {
        const Block block = c.blocks[i];
        c.blocks.erase(c.blocks.begin() + static_cast<std::ptrdiff_t>(i));
        c.bytes -= block.capacity;
        return block;
      }
    }
  }
  void* ptr = nullptr;
  if (posix_memalign(&ptr, kHugePage, capacity) != 0 || ptr == nullptr) {
    c10::profiledCPUMemoryReporter().OutOfMemory(nbytes);
    TORCH_CHECK(false, "fastsd: out of CPU memory allocating ", nbytes, " bytes");
  }
  // Advice only: where the kernel has THP disabled this fails and nothing changes.
  madvise(ptr, capacity, MADV_HUGEPAGE);
  return {ptr, capacity};
}

// 2 MiB aligned, madvise(MADV_HUGEPAGE), recycled through the cache above. Only used through
// empty() below.
struct HugePageAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) override {
    Block* block = new Block(take_block(nbytes));
    c10::profiledCPUMemoryReporter().New(block->ptr, nbytes);
    return {block->ptr, block, &free_huge, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};
#endif

}  // namespace

bool uses_huge_pages(size_t nbytes) { return nbytes > kMinBytes && huge_pages_enabled(); }

size_t empty_cache() {
  size_t freed = 0;
#ifdef __linux__
  std::vector<Block> all;
  {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mutex);
    all.swap(c.blocks);
    freed = c.bytes;
    c.bytes = 0;
  }
  for (const Block& b : all) release(b);
#endif
  return freed;
}

at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options,
                 std::optional<at::MemoryFormat> memory_format) {
#ifdef __linux__
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  const auto dtype = c10::typeMetaToScalarType(options.dtype());
  size_t nbytes = c10::elementSize(dtype);
  for (int64_t s : sizes) nbytes *= static_cast<size_t>(s);
  if (uses_huge_pages(nbytes)) {
    static HugePageAllocator allocator;
    return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                     memory_format);
  }
#endif
  return at::empty(sizes, options.memory_format(memory_format));
}

}  // namespace cpu
}  // namespace fastsd

namespace {
int64_t empty_cache_op() { return static_cast<int64_t>(fastsd::cpu::empty_cache()); }
}  // namespace

TORCH_LIBRARY_FRAGMENT(fastsd_C, m) {
  m.def("empty_cache() -> int", &empty_cache_op);
}
