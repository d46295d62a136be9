// The CUDA mix ops: checks, the tensors' device and its current stream, the launch plan, and the
// kernel launch (mix.cu). Host code only: the host compiler builds it against torch. No value is read
// on the host (no sync): the kernels clamp partner into range(B), and a box only decides which lanes
// take which source (any value is memory-safe); the public functions check the values on the device
// first.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "../mix.h"
#include "mix_kernel.cuh"
#include "ops_common.h"

namespace fastsd {
namespace {

using cuda_mix::Direction;

void run_mix(const at::Tensor& x, const at::Tensor& out, const at::Tensor& partner, const at::Tensor& boxes,
            const at::Tensor& lam, const at::Tensor& use_box, const MixGeometry& g, Direction direction) {
  const bool inplace = direction == Direction::kInPlace;
  const char* op = inplace                                ? "fastsd_C.mix_"
                   : direction == Direction::kBackward ? "fastsd_C.mix_backward"
                                                       : "fastsd_C.mix";
  for (const at::Tensor* t : {&partner, &boxes, &lam, &use_box}) {
    TORCH_CHECK(t->device() == x.device(), op, " (CUDA): all tensors must be on the same CUDA device");
  }
  TORCH_CHECK(x.is_cuda(), op, " (CUDA): x must be a CUDA tensor");
  const cuda_common::Dtype dtype = kernel_dtype(x.scalar_type(), op);
  TORCH_CHECK(g.C * g.H * g.W <= std::numeric_limits<int32_t>::max() && g.B <= std::numeric_limits<int32_t>::max(),
              op, " (CUDA): a sample must have fewer than 2**31 elements, and the batch fewer than 2**31 samples; ",
              "use the triton or torch backend");
  // Run on the tensors' device and its current stream, whatever the current device is.
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  TORCH_CHECK(direction != Direction::kBackward || x.is_floating_point(), op, " (CUDA): the gradient must be floating, got ",
              x.scalar_type());
  // the backward gathers through q, the inverse of partner (a sort: deterministic)
  const at::Tensor p = direction == Direction::kBackward ? at::argsort(partner) : partner.contiguous();
  const at::Tensor b = boxes.contiguous(), l = lam.contiguous(), u = use_box.contiguous();
  const auto plan = cuda_mix::make_plan(x.data_ptr(), inplace ? nullptr : out.data_ptr(), p.data_ptr<int64_t>(),
                                        b.data_ptr<int64_t>(), l.data_ptr(), l.scalar_type() == at::kDouble,
                                        u.data_ptr<bool>(), g.B, g.C, g.H, g.W, g.channels_last,
                                        int(x.element_size()));
  C10_CUDA_CHECK(cuda_mix::launch_mix(plan, dtype, direction, stream));
}

at::Tensor mix_cuda(const at::Tensor& x, const at::Tensor& partner, const at::Tensor& boxes, const at::Tensor& lam,
                    const at::Tensor& use_box) {
  const MixGeometry g = mix_geometry(x, partner, boxes, lam, use_box, "fastsd_C.mix");
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(mix_out_format(g)));
  if (x.numel() != 0) run_mix(x, out, partner, boxes, lam, use_box, g, Direction::kForward);
  return out;
}

at::Tensor mix_backward_cuda(const at::Tensor& grad, const at::Tensor& partner, const at::Tensor& boxes,
                             const at::Tensor& lam, const at::Tensor& use_box) {
  const MixGeometry g = mix_geometry(grad, partner, boxes, lam, use_box, "fastsd_C.mix_backward");
  at::Tensor out = at::empty(grad.sizes(), grad.options().memory_format(mix_out_format(g)));
  if (grad.numel() != 0) run_mix(grad, out, partner, boxes, lam, use_box, g, Direction::kBackward);
  return out;
}

void mix_inplace_cuda(const at::Tensor& x, const at::Tensor& partner, const at::Tensor& boxes, const at::Tensor& lam,
                      const at::Tensor& use_box) {
  const MixGeometry g = mix_geometry(x, partner, boxes, lam, use_box, "fastsd_C.mix_");
  if (x.numel() != 0) run_mix(x, x, partner, boxes, lam, use_box, g, Direction::kInPlace);
}

// The public functions' value checks as device-side asserts (mix_check_kernel): no host sync.
void mix_check_cuda(const at::Tensor& partner, const at::Tensor& sorted, const at::Tensor& boxes,
                    const at::Tensor& lam, int64_t H, int64_t W, bool involution) {
  TORCH_CHECK(partner.dim() == 1 && partner.scalar_type() == at::kLong && sorted.dim() == 1 &&
                  sorted.size(0) == partner.size(0) && sorted.scalar_type() == at::kLong,
              "fastsd_C.mix_check: partner and sorted must be int64 [B]");
  const int64_t B = partner.size(0);
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(0) == B && boxes.size(1) == 4 && boxes.scalar_type() == at::kLong,
              "fastsd_C.mix_check: boxes must be int64 [B, 4]");
  TORCH_CHECK(lam.dim() == 1 && lam.size(0) == B && (lam.scalar_type() == at::kFloat || lam.scalar_type() == at::kDouble),
              "fastsd_C.mix_check: lam must be float32/float64 [B]");
  TORCH_CHECK(partner.is_cuda() && sorted.device() == partner.device() && boxes.device() == partner.device() &&
                  lam.device() == partner.device(),
              "fastsd_C.mix_check (CUDA): all tensors must be on the same CUDA device");
  if (B == 0) return;
  const c10::cuda::CUDAGuard guard(partner.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(partner.device().index()).stream();
  const at::Tensor p = partner.contiguous(), s = sorted.contiguous(), b = boxes.contiguous(), l = lam.contiguous();
  const cuda_mix::CheckParams params{p.data_ptr<int64_t>(), s.data_ptr<int64_t>(), b.data_ptr<int64_t>(),
                                     l.data_ptr(), l.scalar_type() == at::kDouble, involution, B, H, W};
  C10_CUDA_CHECK(cuda_mix::launch_mix_check(params, stream));
}

}  // namespace
}  // namespace fastsd

TORCH_LIBRARY_IMPL(fastsd_C, CUDA, m) {
  m.impl("mix_check", &fastsd::mix_check_cuda);
  m.impl("mix", &fastsd::mix_cuda);
  m.impl("mix_", &fastsd::mix_inplace_cuda);
  m.impl("mix_backward", &fastsd::mix_backward_cuda);
}
