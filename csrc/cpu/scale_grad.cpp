// scale_grad on the CPU (schema in csrc/losses.cpp): torch's own multiply, written into a
// huge-page backed buffer (alloc.h), so a large gradient costs no page fault per 4 KiB.
#include <torch/library.h>

#include "alloc.h"

namespace fastsd {
namespace {

void check_shapes(const at::Tensor& grad, const at::Tensor& scale, at::IntArrayRef ends) {
  TORCH_CHECK(grad.is_contiguous(), "fastsd_C.scale_grad: grad must be contiguous");
  if (scale.dim() == 0) return;
  if (ends.empty()) {
    TORCH_CHECK(scale.dim() == 1 && grad.dim() == 2 && scale.size(0) == grad.size(0),
                "fastsd_C.scale_grad: a per-row scale must be [R] for a grad of [R, K]");
  } else {
    TORCH_CHECK(scale.dim() == 1 && grad.dim() == 1 && scale.size(0) == static_cast<int64_t>(ends.size()) &&
                    ends.back() == grad.numel(),
                "fastsd_C.scale_grad: a per-segment scale needs a flat grad and one end per segment");
  }
}

at::Tensor scale_grad(const at::Tensor& grad, const at::Tensor& scale, at::IntArrayRef ends) {
  TORCH_CHECK(grad.device().is_cpu() && scale.device().is_cpu(), "fastsd_C.scale_grad (CPU): CPU tensors only");
  check_shapes(grad, scale, ends);
  const at::Tensor s = scale.to(grad.scalar_type());
  at::Tensor out = cpu::empty(grad.sizes(), grad.options());
  if (s.dim() == 0) {
    at::mul_out(out, grad, s);
  } else if (ends.empty()) {
    at::mul_out(out, grad, s.unsqueeze(1));
  } else {
    int64_t start = 0;
    for (size_t l = 0; l < ends.size(); ++l) {
      TORCH_CHECK(ends[l] >= start, "fastsd_C.scale_grad: ends must not decrease");
      at::Tensor o = out.slice(0, start, ends[l]);
      at::mul_out(o, grad.slice(0, start, ends[l]), s[l]);
      start = ends[l];
    }
  }
  return out;
}

// The output's shape only, for torch.compile's tracing (fake tensors fall back to Meta kernels;
// sizes may be symbolic there, so the shape checks stay in the CPU kernel).
at::Tensor scale_grad_meta(const at::Tensor& grad, const at::Tensor& /*scale*/, at::IntArrayRef /*ends*/) {
  return at::empty_like(grad);
}

}  // namespace
}  // namespace fastsd

TORCH_LIBRARY_IMPL(fastsd_C, CPU, m) { m.impl("scale_grad", &fastsd::scale_grad); }
TORCH_LIBRARY_IMPL(fastsd_C, Meta, m) { m.impl("scale_grad", &fastsd::scale_grad_meta); }
