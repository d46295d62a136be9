// The CUDA patch swap op: checks, the tensors' device and its current stream, the launch plan, and
// the kernel launch (patch_swap.cu). Host code only: the host compiler builds it against torch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "../patch_swap.h"
#include "ops_common.h"
#include "patch_swap_kernel.cuh"

namespace fastsd {
namespace {

at::Tensor run_patch_swap(const at::Tensor& x, const at::Tensor& partner, const at::Tensor& mask, bool backward) {
  const PatchSwapGeometry g = patch_swap_geometry(x, partner, mask);
  TORCH_CHECK(x.is_cuda() && partner.device() == x.device() && mask.device() == x.device(),
              "fastsd_C.patch_swap (CUDA): all tensors must be on the same CUDA device");
  const cuda_patch_swap::Dtype dtype = kernel_dtype(x.scalar_type(), "fastsd_C.patch_swap");
  // Run on the tensors' device and its current stream, whatever the current device is.
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(patch_swap_out_format(g)));
  if (x.numel() == 0) return out;
  const int64_t row_len = g.W * (g.channels_last ? g.C : 1);
  constexpr int64_t kLimit = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(g.H * row_len <= kLimit && g.W * g.gw <= kLimit && g.H * g.gh <= kLimit && g.B <= kLimit,
              "fastsd_C.patch_swap (CUDA): a plane of H x W (x C in channels_last) must have fewer than 2**31 "
              "elements; use the triton or torch backend for larger images");
  const at::Tensor p = partner.contiguous();
  const at::Tensor src = backward ? at::argsort(p) : p;  // backward: q, the inverse (a sort: deterministic)
  const auto plan = cuda_patch_swap::make_plan(x.data_ptr(), out.data_ptr(), src.data_ptr<int64_t>(),
                                               static_cast<const uint8_t*>(mask.data_ptr()), backward, g.B, g.C, g.H,
                                               g.W, g.gh, g.gw, g.channels_last, int(x.element_size()));
  C10_CUDA_CHECK(cuda_patch_swap::launch_cell_select(plan, dtype, backward, stream));
  return out;
}

at::Tensor patch_swap_cuda(const at::Tensor& x, const at::Tensor& partner, const at::Tensor& mask) {
  return run_patch_swap(x, partner, mask, /*backward=*/false);
}

at::Tensor patch_swap_backward_cuda(const at::Tensor& grad, const at::Tensor& partner, const at::Tensor& mask) {
  return run_patch_swap(grad, partner, mask, /*backward=*/true);
}

// The public function's permutation check as a device-side assert (permutation_check_kernel, one
// launch after the caller's sort): no host sync.
void patch_swap_check_cuda(const at::Tensor& sorted) {
  TORCH_CHECK(sorted.dim() == 1 && sorted.scalar_type() == at::kLong && sorted.is_cuda(),
              "fastsd_C.patch_swap_check: sorted must be an int64 [B] CUDA tensor");
  const int64_t B = sorted.size(0);
  if (B == 0) return;
  const c10::cuda::CUDAGuard guard(sorted.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(sorted.device().index()).stream();
  const at::Tensor s = sorted.contiguous();
  C10_CUDA_CHECK(cuda_patch_swap::launch_permutation_check(cuda_patch_swap::PermutationCheck{s.data_ptr<int64_t>(), B},
                                                           stream));
}

}  // namespace
}  // namespace fastsd

TORCH_LIBRARY_IMPL(fastsd_C, CUDA, m) {
  m.impl("patch_swap", &fastsd::patch_swap_cuda);
  m.impl("patch_swap_backward", &fastsd::patch_swap_backward_cuda);
  m.impl("patch_swap_check", &fastsd::patch_swap_check_cuda);
}
