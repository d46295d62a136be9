// CUDA kernels of patch swap: one grid-stride gather per direction, int64 indexing.
//
// Same formula as csrc/cpu/patch_swap.cpp (`cell_select`): for element (b, c, h, w) in cell (ch, cw)
//   out = (keep ? x[b] : 0) + (take ? x[src[b]] : 0),  keep = !mask[b, ch, cw],
//   take = mask[mask_row[b], ch, cw]
// forward: src = partner, mask_row = b; backward: src = mask_row = q (inverse of partner).
// Each output element is written once and each selected input element read once: no atomics.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../patch_swap.h"

namespace fastsd {
namespace {

template <typename T, bool kChannelsLast>
__global__ void cell_select_kernel(const T* __restrict__ x, T* __restrict__ out, const int64_t* __restrict__ src,
                                   const int64_t* __restrict__ mask_row, const uint8_t* __restrict__ mask,
                                   bool identity_mask_row, int64_t n, int64_t C, int64_t H, int64_t W, int64_t gh,
                                   int64_t gw) {
  const int64_t sample = C * H * W;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t b = i / sample;
    const int64_t e = i - b * sample;
    int64_t h, w;
    if (kChannelsLast) {
      const int64_t p = e / C;  // pixel index h * W + w
      h = p / W;
      w = p - h * W;
    } else {
      const int64_t p = e % (H * W);
      h = p / W;
      w = p - h * W;
    }
    const int64_t cell = (h * gh / H) * gw + (w * gw / W);
    const int64_t mrow = identity_mask_row ? b : mask_row[b];
    const bool keep = mask[b * gh * gw + cell] == 0;
    const bool take = mask[mrow * gh * gw + cell] != 0;
    T v = T(0);
    if (keep && take) {
      v = T(x[i] + x[src[b] * sample + e]);
    } else if (keep) {
      v = x[i];
    } else if (take) {
      v = x[src[b] * sample + e];
    }
    out[i] = v;
  }
}

at::Tensor launch(const at::Tensor& x, const at::Tensor& partner, const at::Tensor& mask, bool backward) {
  const PatchSwapGeometry g = patch_swap_geometry(x, partner, mask);
  TORCH_CHECK(x.is_cuda() && partner.device() == x.device() && mask.device() == x.device(),
              "fastsd_C.patch_swap (CUDA): all tensors must be on the same CUDA device");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(patch_swap_out_format(g)));
  const int64_t n = x.numel();
  if (n == 0) return out;
  const at::Tensor p = partner.contiguous();
  const at::Tensor inverse = backward ? at::argsort(p) : p;  // sort: deterministic, no atomics
  const int64_t threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, int64_t(65535) * 32);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.data_ptr());
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, x.scalar_type(), "patch_swap_cuda", [&] {
    const int64_t* src = backward ? inverse.data_ptr<int64_t>() : p.data_ptr<int64_t>();
    if (g.channels_last) {
      cell_select_kernel<scalar_t, true><<<blocks, threads, 0, stream>>>(
          x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), src, inverse.data_ptr<int64_t>(), m, !backward, n,
          g.C, g.H, g.W, g.gh, g.gw);
    } else {
      cell_select_kernel<scalar_t, false><<<blocks, threads, 0, stream>>>(
          x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), src, inverse.data_ptr<int64_t>(), m, !backward, n,
          g.C, g.H, g.W, g.gh, g.gw);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor patch_swap_cuda(const at::Tensor& x, const at::Tensor& partner, const at::Tensor& mask) {
  return launch(x, partner, mask, /*backward=*/false);
}

at::Tensor patch_swap_backward_cuda(const at::Tensor& grad, const at::Tensor& partner, const at::Tensor& mask) {
  return launch(grad, partner, mask, /*backward=*/true);
}

}  // namespace
}  // namespace fastsd

TORCH_LIBRARY_IMPL(fastsd_C, CUDA, m) {
  m.impl("patch_swap", &fastsd::patch_swap_cuda);
  m.impl("patch_swap_backward", &fastsd::patch_swap_backward_cuda);
}
