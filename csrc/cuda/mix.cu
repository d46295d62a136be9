// CUDA kernels of mix: one per dtype, vector width (16 bytes, or one element where rows are not whole
// 16-byte vectors) and direction (out of place, in place, and the backward for floating dtypes). The
// bodies are mix_thread, mix_inplace_thread and mix_backward_thread in mix_kernel.cuh; this file includes no torch headers but c10's 16-bit floats,
// so nvcc compiles it in seconds per architecture.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "mix_kernel.cuh"

// Bit-exact MixUp needs IEEE products and sums: fast math (flush-to-zero, approximate ops) would not
// match PyTorch's kernels.
#ifdef __USE_FAST_MATH__
#error "csrc/cuda/mix.cu must not be built with --use_fast_math"
#endif

namespace fastsd {
namespace cuda_mix {
namespace {

template <typename T, int V>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) mix_kernel(const Params p) {
  mix_thread<T, V>(p, Dim3{blockIdx.x, blockIdx.y, blockIdx.z}, Dim3{threadIdx.x, threadIdx.y, threadIdx.z},
                   Dim3{gridDim.x, gridDim.y, gridDim.z});
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) mix_inplace_kernel(const Params p) {
  mix_inplace_thread<T, V>(p, Dim3{blockIdx.x, blockIdx.y, blockIdx.z}, Dim3{threadIdx.x, threadIdx.y, threadIdx.z},
                           Dim3{gridDim.x, gridDim.y, gridDim.z});
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) mix_backward_kernel(const Params p) {
  mix_backward_thread<T, V>(p, Dim3{blockIdx.x, blockIdx.y, blockIdx.z}, Dim3{threadIdx.x, threadIdx.y, threadIdx.z},
                            Dim3{gridDim.x, gridDim.y, gridDim.z});
}

// false where there is no such kernel (the backward of uint8, which has no gradient)
template <typename T, int V>
bool launch_width(const Plan& plan, Direction direction, cudaStream_t stream) {
  const dim3 grid(plan.grid.x, plan.grid.y, plan.grid.z), block(plan.block.x, plan.block.y, plan.block.z);
  switch (direction) {
    case Direction::kForward: mix_kernel<T, V><<<grid, block, 0, stream>>>(plan.p); return true;
    case Direction::kInPlace: mix_inplace_kernel<T, V><<<grid, block, 0, stream>>>(plan.p); return true;
    case Direction::kBackward:
      if constexpr (std::is_same<T, uint8_t>::value) {
        return false;
      } else {
        mix_backward_kernel<T, V><<<grid, block, 0, stream>>>(plan.p);
        return true;
      }
  }
  return false;
}

template <typename T>
bool launch_typed(const Plan& plan, Direction direction, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  return plan.vec == kVec ? launch_width<T, kVec>(plan, direction, stream) : launch_width<T, 1>(plan, direction, stream);
}

__global__ void __launch_bounds__(kThreads) mix_check_kernel(const CheckParams c) {
  mix_check_thread(c, Dim3{blockIdx.x, blockIdx.y, blockIdx.z}, Dim3{threadIdx.x, threadIdx.y, threadIdx.z});
}

}  // namespace

cudaError_t launch_mix_check(const CheckParams& params, cudaStream_t stream) {
  const unsigned blocks = unsigned((params.B + kThreads - 1) / kThreads);
  if (blocks > 0) mix_check_kernel<<<blocks, kThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

cudaError_t launch_mix(const Plan& plan, Dtype dtype, Direction direction, cudaStream_t stream) {
  bool launched = false;
  switch (dtype) {
    case Dtype::kUInt8: launched = launch_typed<uint8_t>(plan, direction, stream); break;
    case Dtype::kHalf: launched = launch_typed<c10::Half>(plan, direction, stream); break;
    case Dtype::kBFloat16: launched = launch_typed<c10::BFloat16>(plan, direction, stream); break;
    case Dtype::kFloat: launched = launch_typed<float>(plan, direction, stream); break;
    case Dtype::kDouble: launched = launch_typed<double>(plan, direction, stream); break;
  }
  return launched ? cudaGetLastError() : cudaErrorInvalidValue;
}

}  // namespace cuda_mix
}  // namespace fastsd
