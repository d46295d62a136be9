// Shared by the CPU and CUDA patch swap kernels: argument checks and the output's layout.
#pragma once
#include <ATen/ATen.h>

namespace fastsd {

struct PatchSwapGeometry {
  int64_t B, C, H, W, gh, gw;
  bool channels_last;  // x is NHWC in memory (else NCHW)
};

inline PatchSwapGeometry patch_swap_geometry(const at::Tensor& x, const at::Tensor& partner,
                                             const at::Tensor& mask) {
  TORCH_CHECK(x.dim() == 4, "fastsd_C.patch_swap: x must be [B, C, H, W], got ", x.sizes());
  TORCH_CHECK(partner.dim() == 1 && partner.size(0) == x.size(0) && partner.scalar_type() == at::kLong,
              "fastsd_C.patch_swap: partner must be int64 [B]");
  TORCH_CHECK(mask.dim() == 3 && mask.size(0) == x.size(0) && mask.is_contiguous() &&
                  (mask.scalar_type() == at::kBool || mask.scalar_type() == at::kByte),
              "fastsd_C.patch_swap: mask must be contiguous bool/uint8 [B, gh, gw]");
  PatchSwapGeometry g{x.size(0), x.size(1), x.size(2), x.size(3), mask.size(1), mask.size(2), false};
  TORCH_CHECK(g.gh >= 1 && g.gh <= g.H && g.gw >= 1 && g.gw <= g.W,
              "fastsd_C.patch_swap: mask grid must satisfy 1 <= gh <= H and 1 <= gw <= W");
  if (!x.is_contiguous()) {
    TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast),
                "fastsd_C.patch_swap: x must be contiguous NCHW or channels_last");
    g.channels_last = true;
  }
  return g;
}

// The output keeps x's layout.
inline at::MemoryFormat patch_swap_out_format(const PatchSwapGeometry& g) {
  return g.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

}  // namespace fastsd
