// What the torch-facing CUDA launchers (csrc/cuda/*_ops.cpp, host code) share.
#pragma once
#include <ATen/ATen.h>

#include "vector_access.cuh"

namespace fastsd {

// The kernels' element type of a tensor dtype; `op` names the caller in the error.
inline cuda_common::Dtype kernel_dtype(at::ScalarType type, const char* op) {
  switch (type) {
    case at::kByte: return cuda_common::Dtype::kUInt8;
    case at::kHalf: return cuda_common::Dtype::kHalf;
    case at::kBFloat16: return cuda_common::Dtype::kBFloat16;
    case at::kFloat: return cuda_common::Dtype::kFloat;
    case at::kDouble: return cuda_common::Dtype::kDouble;
    default: TORCH_CHECK(false, op, " (CUDA): unsupported dtype ", type);
  }
}

}  // namespace fastsd
