// Schemas of the patch swap kernels (SPEC section 3).
//
//   patch_swap(x, partner, mask):
//     out[i, c, h, w] = x[partner[i], c, h, w] if mask[i, cell(h, w)] else x[i, c, h, w]
//   patch_swap_backward(grad, partner, mask), q the inverse permutation of partner:
//     grad_x[j] = grad[j] * (1 - mask[j]) + grad[q[j]] * mask[q[j]]      (a gather: no atomics)
//
// cell(h, w) = (h * gh / H, w * gw / W) in integer division. x / grad are contiguous NCHW or
// channels_last (the output has the same layout); partner is int64 [B]; mask is bool/uint8 [B, gh, gw].
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastsd_C, m) {
  m.def("patch_swap(Tensor x, Tensor partner, Tensor mask) -> Tensor");
  m.def("patch_swap_backward(Tensor grad, Tensor partner, Tensor mask) -> Tensor");
  // CUDA only: asserts on the device that `sorted` (partner sorted) is range(B), before the kernel
  m.def("patch_swap_check(Tensor sorted) -> ()");
}
