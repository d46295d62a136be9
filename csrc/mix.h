// Shared by the CPU and CUDA mix kernels: the arguments' shapes and dtypes, and x's layout (the
// output keeps it). Values (partner, boxes, lam) are the kernels' business: the CPU one checks them
// as it reads them, the CUDA one clamps partner and reads boxes only in comparisons.
#pragma once
#include <ATen/ATen.h>

namespace fastsd {

struct MixGeometry {
  int64_t B, C, H, W;
  bool channels_last;  // x is NHWC in memory (else NCHW)
};

// `op` names the caller in the errors (fastsd_C.mix, fastsd_C.mix_, fastsd_C.mix_backward).
inline MixGeometry mix_geometry(const at::Tensor& x, const at::Tensor& partner, const at::Tensor& boxes,
                                const at::Tensor& lam, const at::Tensor& use_box, const char* op) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be [B, C, H, W], got ", x.sizes());
  const int64_t B = x.size(0);
  TORCH_CHECK(partner.dim() == 1 && partner.size(0) == B && partner.scalar_type() == at::kLong,
              op, ": partner must be int64 [B]");
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(0) == B && boxes.size(1) == 4 && boxes.scalar_type() == at::kLong,
              op, ": boxes must be int64 [B, 4]");
  TORCH_CHECK(lam.dim() == 1 && lam.size(0) == B &&
                  (lam.scalar_type() == at::kFloat || lam.scalar_type() == at::kDouble),
              op, ": lam must be float32/float64 [B]");
  TORCH_CHECK(use_box.dim() == 1 && use_box.size(0) == B && use_box.scalar_type() == at::kBool,
              op, ": use_box must be bool [B]");
  MixGeometry g{B, x.size(1), x.size(2), x.size(3), false};
  if (!x.is_contiguous()) {
    TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast),
                op, ": x must be contiguous NCHW or channels_last");
    g.channels_last = true;
  }
  return g;
}

inline at::MemoryFormat mix_out_format(const MixGeometry& g) {
  return g.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

}  // namespace fastsd
