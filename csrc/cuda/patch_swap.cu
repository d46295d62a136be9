// CUDA kernels of patch swap: one per dtype, direction and vector width (16 bytes, or one element
// where rows are not whole 16-byte vectors). The body is cell_select_thread in patch_swap_kernel.cuh;
// this file includes no torch headers, so nvcc compiles it in seconds per architecture.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "patch_swap_kernel.cuh"

namespace fastsd {
namespace cuda_patch_swap {
namespace {

template <typename T, int V, bool kBackward>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) cell_select_kernel(const Params p) {
  cell_select_thread<T, V, kBackward>(p, Dim3{blockIdx.x, blockIdx.y, blockIdx.z},
                                      Dim3{threadIdx.x, threadIdx.y, threadIdx.z}, Dim3{gridDim.x, gridDim.y, gridDim.z});
}

template <typename T>
void launch_typed(const Plan& plan, bool backward, cudaStream_t stream) {
  const dim3 grid(plan.grid.x, plan.grid.y, plan.grid.z), block(plan.block.x, plan.block.y, plan.block.z);
  constexpr int kVec = 16 / sizeof(T);
  if (plan.vec == kVec) {
    if (backward) {
      cell_select_kernel<T, kVec, true><<<grid, block, 0, stream>>>(plan.p);
    } else {
      cell_select_kernel<T, kVec, false><<<grid, block, 0, stream>>>(plan.p);
    }
  } else if (backward) {
    cell_select_kernel<T, 1, true><<<grid, block, 0, stream>>>(plan.p);
  } else {
    cell_select_kernel<T, 1, false><<<grid, block, 0, stream>>>(plan.p);
  }
}

__global__ void __launch_bounds__(kThreads) permutation_check_kernel(const PermutationCheck c) {
  permutation_check_thread(c, Dim3{blockIdx.x, blockIdx.y, blockIdx.z}, Dim3{threadIdx.x, threadIdx.y, threadIdx.z});
}

}  // namespace

cudaError_t launch_permutation_check(const PermutationCheck& check, cudaStream_t stream) {
  const unsigned blocks = unsigned((check.B + kThreads - 1) / kThreads);
  if (blocks > 0) permutation_check_kernel<<<blocks, kThreads, 0, stream>>>(check);
  return cudaGetLastError();
}

cudaError_t launch_cell_select(const Plan& plan, Dtype dtype, bool backward, cudaStream_t stream) {
  switch (dtype) {
    case Dtype::kUInt8: launch_typed<uint8_t>(plan, backward, stream); break;
    case Dtype::kHalf: launch_typed<c10::Half>(plan, backward, stream); break;
    case Dtype::kBFloat16: launch_typed<c10::BFloat16>(plan, backward, stream); break;
    case Dtype::kFloat: launch_typed<float>(plan, backward, stream); break;
    case Dtype::kDouble: launch_typed<double>(plan, backward, stream); break;
  }
  return cudaGetLastError();
}

}  // namespace cuda_patch_swap
}  // namespace fastsd
