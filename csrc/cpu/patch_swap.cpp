// CPU kernels of patch swap, parallel over image rows with at::parallel_for.
//
// Both directions are one gather, `cell_select`: for each pixel of row (b, h), in cell (ch, cw),
//   out = (keep ? x[b] : 0) + (take ? x[src[b]] : 0)
//   keep = !mask[b, ch, cw],  take = mask[mask_row[b], ch, cw]
// forward:  src = partner, mask_row = b  (exactly one of keep/take holds: a copy)
// backward: src = mask_row = q, the inverse permutation of partner.
// Within a row, the pixels of one cell are a contiguous run (W / gw pixels in NCHW, times C in
// channels_last), so long runs (neighbouring cells with the same choice merged) are memcpy'd;
// short runs use a branch-free bitwise select that the compiler vectorises.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../patch_swap.h"
#include "alloc.h"
#include "capability.h"

namespace fastsd {
namespace {

// Runs of at least this many elements are copied with memcpy; shorter ones by a bitwise select.
constexpr int64_t kMinMemcpyRun = 16;

// Same-width unsigned integer, for a branch-free, bit-exact select that the compiler vectorises
// (NaN payloads and -0.0 are copied as they are).
template <typename T>
using Bits = std::conditional_t<sizeof(T) == 1, uint8_t,
                                std::conditional_t<sizeof(T) == 2, uint16_t,
                                                   std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>>;

template <typename T>
inline void run(T* o, const T* self, const T* other, bool keep, bool take, int64_t n) {
  if (keep && take) {
    for (int64_t k = 0; k < n; ++k) o[k] = self[k] + other[k];
  } else if (keep) {
    std::memcpy(o, self, n * sizeof(T));
  } else if (take) {
    std::memcpy(o, other, n * sizeof(T));
  } else {
    std::memset(o, 0, n * sizeof(T));  // all-zero bits are 0 in every supported dtype
  }
}

// out = (s & keep) | (t & take), element by element, and the forward's case keep == ~take (one bit
// stream fewer to read). __restrict and plain arguments let the compiler vectorise them (csrc is
// built with -fno-strict-aliasing for the bit casts, so without them every store could alias every
// loaded bound). One copy per vector path (capability.h), picked by select_loops().
#define FASTSD_SELECT_LOOPS(ISA, ATTRIBUTES)                                                              \
  namespace ISA {                                                                                        \
  template <typename U>                                                                                  \
  ATTRIBUTES void select_bits(U* __restrict o, const U* __restrict s, const U* __restrict t,             \
                              const U* __restrict keep, const U* __restrict take, int64_t n) {           \
    for (int64_t e = 0; e < n; ++e) o[e] = (s[e] & keep[e]) | (t[e] & take[e]);                          \
  }                                                                                                      \
  template <typename U>                                                                                  \
  ATTRIBUTES void select_take(U* __restrict o, const U* __restrict s, const U* __restrict t,             \
                              const U* __restrict take, int64_t n) {                                     \
    for (int64_t e = 0; e < n; ++e) o[e] = (s[e] & ~take[e]) | (t[e] & take[e]);                         \
  }                                                                                                      \
  }

#if defined(FASTSD_MULTI_ISA)
FASTSD_SELECT_LOOPS(avx512, __attribute__((target(FASTSD_TARGET_AVX512))))
FASTSD_SELECT_LOOPS(avx2, __attribute__((target(FASTSD_TARGET_AVX2))))
#endif
FASTSD_SELECT_LOOPS(baseline, )
#undef FASTSD_SELECT_LOOPS

template <typename U>
struct SelectLoops {
  void (*bits)(U*, const U*, const U*, const U*, const U*, int64_t);
  void (*take)(U*, const U*, const U*, const U*, int64_t);
};

template <typename U>
SelectLoops<U> select_loops() {
#if defined(FASTSD_MULTI_ISA)
  switch (cpu::cpu_isa()) {
    case cpu::Isa::kAvx512:
      return {&avx512::select_bits<U>, &avx512::select_take<U>};
    case cpu::Isa::kAvx2:
      return {&avx2::select_bits<U>, &avx2::select_take<U>};
    default:
      break;
  }
#endif
  return {&baseline::select_bits<U>, &baseline::select_take<U>};
}

template <typename T>
void cell_select(const T* x, T* out, const int64_t* src, const int64_t* mask_row, const uint8_t* mask,
                 const PatchSwapGeometry& geometry, bool forward) {
  using U = Bits<T>;
  const SelectLoops<U> loops = select_loops<U>();
  const int64_t B = geometry.B, C = geometry.C, H = geometry.H, W = geometry.W, gh = geometry.gh, gw = geometry.gw;
  const bool channels_last = geometry.channels_last;
  const int64_t pix = channels_last ? C : 1;     // elements per pixel in a row
  const int64_t planes = channels_last ? 1 : C;  // NCHW: the C planes of a row share its cells
  const int64_t row_len = W * pix;
  const int64_t plane_stride = H * W;
  const int64_t sample = C * H * W;
  // First column of each cell along w: the run of cell cw is [col[cw], col[cw + 1]).
  std::vector<int64_t> col(gw + 1);
  for (int64_t cw = 0; cw <= gw; ++cw) col[cw] = (cw * W + gw - 1) / gw;
  const bool by_runs = (W / gw) * pix >= kMinMemcpyRun;
  // Work unit: one cell row (b, ch), i.e. image rows [h0, h1) that share the row's cells. Those rows
  // are contiguous in memory (within a plane in NCHW, within the sample in channels_last), so the
  // select path handles a whole unit-plane in one vectorised call.
  const int64_t rows_per_unit = (H + gh - 1) / gh;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, rows_per_unit * row_len * planes));

  at::parallel_for(0, B * gh, grain, [&](int64_t begin, int64_t end) {
    // Select path: keep / take bits of one cell row, tiled over its image rows.
    // (The forward reads take bits only: keep == !take there.)
    std::vector<U> keep_bits(by_runs || forward ? 0 : rows_per_unit * row_len);
    std::vector<U> take_bits(by_runs ? 0 : rows_per_unit * row_len);
    std::vector<int64_t> both;  // cells where keep and take hold (backward only): s + t
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / gh, ch = u % gh;
      const int64_t h0 = (ch * H + gh - 1) / gh, h1 = ((ch + 1) * H + gh - 1) / gh;
      const int64_t block = (h1 - h0) * row_len;  // elements of the unit in one plane
      const uint8_t* own_cells = mask + (b * gh + ch) * gw;
      const uint8_t* other_cells = mask + (mask_row[b] * gh + ch) * gw;
      const int64_t self_base = b * sample + h0 * row_len;
      const int64_t other_base = src[b] * sample + h0 * row_len;
      if (!by_runs) {
        both.clear();
        for (int64_t cw = 0; cw < gw; ++cw) {
          const bool k = own_cells[cw] == 0, t = other_cells[cw] != 0;
          if (k && t) both.push_back(cw);
          if (!forward) {
            std::fill(keep_bits.begin() + col[cw] * pix, keep_bits.begin() + col[cw + 1] * pix, k ? U(~U(0)) : U(0));
          }
          std::fill(take_bits.begin() + col[cw] * pix, take_bits.begin() + col[cw + 1] * pix, t ? U(~U(0)) : U(0));
        }
        for (int64_t r = 1; r < h1 - h0; ++r) {  // tile the row's pattern over the unit's rows
          if (!forward) std::copy(keep_bits.begin(), keep_bits.begin() + row_len, keep_bits.begin() + r * row_len);
          std::copy(take_bits.begin(), take_bits.begin() + row_len, take_bits.begin() + r * row_len);
        }
      }
      for (int64_t p = 0; p < planes; ++p) {
        const T* self = x + self_base + p * plane_stride;
        const T* other = x + other_base + p * plane_stride;
        T* o = out + self_base + p * plane_stride;
        if (!by_runs) {
          if (forward) {
            loops.take(reinterpret_cast<U*>(o), reinterpret_cast<const U*>(self), reinterpret_cast<const U*>(other),
                       take_bits.data(), block);
          } else {
            loops.bits(reinterpret_cast<U*>(o), reinterpret_cast<const U*>(self),
                       reinterpret_cast<const U*>(other), keep_bits.data(), take_bits.data(), block);
          }
          for (const int64_t cw : both) {
            for (int64_t r = 0; r < block; r += row_len) {
              for (int64_t e = r + col[cw] * pix; e < r + col[cw + 1] * pix; ++e) o[e] = self[e] + other[e];
            }
          }
          continue;
        }
        for (int64_t r = 0; r < block; r += row_len) {
          // merge neighbouring cells with the same choice into one longer run
          int64_t cw = 0;
          while (cw < gw) {
            const bool k = own_cells[cw] == 0, t = other_cells[cw] != 0;
            int64_t stop = cw + 1;
            while (stop < gw && (own_cells[stop] == 0) == k && (other_cells[stop] != 0) == t) ++stop;
            const int64_t a = r + col[cw] * pix, n = (col[stop] - col[cw]) * pix;
            run(o + a, self + a, other + a, k, t, n);
            cw = stop;
          }
        }
      }
    }
  });
}

at::Tensor launch(const at::Tensor& x, const at::Tensor& partner, const at::Tensor& mask, bool backward) {
  const PatchSwapGeometry g = patch_swap_geometry(x, partner, mask);
  TORCH_CHECK(x.device().is_cpu() && partner.device().is_cpu() && mask.device().is_cpu(),
              "fastsd_C.patch_swap (CPU): all tensors must be on the CPU");
  at::Tensor out = cpu::empty(x.sizes(), x.options(), patch_swap_out_format(g));  // huge pages when large
  if (x.numel() == 0) return out;
  const at::Tensor p = partner.contiguous();
  const int64_t* pp = p.data_ptr<int64_t>();
  std::vector<int64_t> identity(g.B), inverse(g.B, -1);
  for (int64_t i = 0; i < g.B; ++i) {
    identity[i] = i;
    // The public function leaves this check to the C++ backend (a ValueError, as its own check).
    TORCH_CHECK_VALUE(pp[i] >= 0 && pp[i] < g.B && inverse[pp[i]] < 0,
                      "fastsd.patch_swap: partner must be a permutation of range(B); partner[", i, "] = ", pp[i]);
    inverse[pp[i]] = i;
  }
  const int64_t* src = backward ? inverse.data() : pp;
  const int64_t* mask_row = backward ? inverse.data() : identity.data();
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.data_ptr());
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, x.scalar_type(), "patch_swap_cpu", [&] {
    cell_select<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), src, mask_row, m, g, !backward);
  });
  return out;
}

at::Tensor patch_swap_cpu(const at::Tensor& x, const at::Tensor& partner, const at::Tensor& mask) {
  return launch(x, partner, mask, /*backward=*/false);
}

at::Tensor patch_swap_backward_cpu(const at::Tensor& grad, const at::Tensor& partner, const at::Tensor& mask) {
  return launch(grad, partner, mask, /*backward=*/true);
}

}  // namespace
}  // namespace fastsd

TORCH_LIBRARY_IMPL(fastsd_C, CPU, m) {
  m.impl("patch_swap", &fastsd::patch_swap_cpu);
  m.impl("patch_swap_backward", &fastsd::patch_swap_backward_cpu);
}
