// Output buffers of the CPU kernels.
//
// glibc serves allocations above its mmap threshold with a fresh mmap each time. The threshold
// adapts to the sizes a program frees, up to 32 MiB, so in a training loop every buffer of more
// than 32 MiB is mapped afresh and pays one page fault per 4 KiB page: on the machines this was
// measured on, that is most of the time of a memory-bound kernel (60 MiB: 32 ms of faults against
// an 8 ms write). fastsd::cpu::empty backs those buffers with transparent huge pages
// (madvise(MADV_HUGEPAGE), as PyTorch's own allocator does for everything under
// THP_MEM_ALLOC_ENABLE=1): 512 times fewer faults. Smaller buffers, which glibc recycles from its
// heap without faults (huge pages there measured 4x slower: 3 MiB outputs re-faulted each call),
// other platforms, and FASTSD_HUGEPAGES=0 use at::empty. Freed buffers are kept for reuse (a
// bounded cache, like CUDA's caching allocator; alloc.cpp). The allocations are reported to the
// profiler like c10's (a cached buffer counts as freed).
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace fastsd {
namespace cpu {

// at::empty on the CPU, huge-page backed above 32 MiB (see above).
at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options,
                 std::optional<at::MemoryFormat> memory_format = std::nullopt);

// Whether buffers of nbytes come from huge pages in this process (FASTSD_HUGEPAGES, platform).
bool uses_huge_pages(size_t nbytes);

// Frees the huge-page buffers kept for reuse (at most 8 and 2 GiB); returns their bytes.
// torch.ops.fastsd_C.empty_cache(), fastsd.empty_cache().
size_t empty_cache();

}  // namespace cpu
}  // namespace fastsd
