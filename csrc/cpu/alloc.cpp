// fastsd::cpu::empty: huge-page backed output buffers (see alloc.h).
#include "alloc.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <cstring>
#include <new>

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
void free_huge(void* ptr) {
  c10::profiledCPUMemoryReporter().Delete(ptr);
  std::free(ptr);
}

// 2 MiB aligned, madvise(MADV_HUGEPAGE) over whole huge pages. Only used through empty() below.
struct HugePageAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) override {
    void* ptr = nullptr;
    if (posix_memalign(&ptr, kHugePage, nbytes) != 0 || ptr == nullptr) {
      c10::profiledCPUMemoryReporter().OutOfMemory(nbytes);
      TORCH_CHECK(false, "fastsd: out of CPU memory allocating ", nbytes, " bytes");
    }
    // Advice only: where the kernel has THP disabled this fails and nothing changes.
    madvise(ptr, (nbytes / kHugePage) * kHugePage, MADV_HUGEPAGE);
    c10::profiledCPUMemoryReporter().New(ptr, nbytes);
    return {ptr, ptr, &free_huge, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &free_huge; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};
#endif

}  // namespace

bool uses_huge_pages(size_t nbytes) { return nbytes > kMinBytes && huge_pages_enabled(); }

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
