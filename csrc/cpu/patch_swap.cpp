// CPU kernels of patch swap, parallel over groups of cell rows with at::parallel_for.
//
// Both directions are one gather, `cell_select`: for each pixel of row (b, h), in cell (ch, cw),
//   out = (keep ? x[b] : 0) + (take ? x[src[b]] : 0)
//   keep = !mask[b, ch, cw],  take = mask[mask_row[b], ch, cw]
// forward:  src = partner, mask_row = b  (exactly one of keep/take holds: a copy)
// backward: src = mask_row = q, the inverse permutation of partner.
// Within a row, the pixels of one cell are a contiguous run (W / gw pixels in NCHW, times C in
// channels_last). A cell row with one choice throughout is one contiguous block per plane (one
// copy); wide cells (>= kMinCopyRunBytes) are copied run by run (neighbouring cells with the
// same choice merged); narrow ones take a branch-free bit select (select.h) over the whole cell
// row, its mask expanded from the cells' bits. (Copies are select.h's copy loop, not memcpy: see
// there.) A call per run of 16-byte runs costs more than the select's second read, and that read
// is made a cache hit by walking the cell rows in the permutation's cycle order (cycle_order). The
// forward with an involution partner (fastsd's pairs) goes further on the select path: one unit
// writes both outputs of a pair from one read of both rows (select.h's pair loop, or its swap loop
// where the pair's cells are the same, which the backward takes too). On the select path a unit
// is several cell rows (a whole small image), so that its fixed costs are paid once an image, not
// once four image rows.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../patch_swap.h"
#include "alloc.h"
#include "capability.h"
#include "select.h"

namespace fastsd {
namespace {

constexpr int64_t kWordBits = 32;  // cells per mask bit word (wider grids expand lane by lane)

// Runs of at least this many bytes (every cell of the call) are copied run by run (a call each);
// narrower cells take the vector select, which reads both sources but costs no call per run.
constexpr int64_t kMinCopyRunBytes = 128;

// On the select path a work unit takes consecutive cell rows up to about this many elements a plane
// (a 32 x 32 image: all 8 cell rows of 4 px, 1024 elements): per-unit costs (the bit words, the
// calls, the uniformity test) then amortise over a whole small image rather than four image rows.
constexpr int64_t kSelectUnitElements = 2048;

// A run of n elements: a copy from self or other (select.h's copy loop, not memcpy: see there), their
// sum (the backward, where a cell both keeps and takes), or zeros.
template <typename T>
inline void run(const cpu::SelectLoops<cpu::Bits<T>>& loops, T* o, const T* self, const T* other, bool keep,
                bool take, int64_t n) {
  using U = cpu::Bits<T>;
  if (keep && take) {
    for (int64_t k = 0; k < n; ++k) o[k] = self[k] + other[k];
  } else if (keep || take) {
    loops.copy(reinterpret_cast<U*>(o), reinterpret_cast<const U*>(keep ? self : other), U(~U(0)), n);
  } else {
    std::memset(o, 0, n * sizeof(T));  // all-zero bits are 0 in every supported dtype
  }
}

// The work units (b, k) in the order of src's cycles: for each cycle (b0, b1 = src[b0], ...), each
// group k of cell rows, each member. Unit (b_i, k) reads its partner slice x[b_{i+1}] rows of k,
// which is the next unit's own slice: the second read of each byte of x is a cache hit, not a trip
// to memory (fastsd's pairs are involutions: cycles of two).
std::vector<int64_t> cycle_order(const int64_t* src, int64_t B, int64_t gh) {
  std::vector<int64_t> units;
  units.reserve(B * gh);
  std::vector<char> seen(B, 0);
  std::vector<int64_t> cycle;
  for (int64_t b0 = 0; b0 < B; ++b0) {
    if (seen[b0]) continue;
    cycle.clear();
    for (int64_t j = b0; !seen[j]; j = src[j]) {
      seen[j] = 1;
      cycle.push_back(j);
    }
    for (int64_t ch = 0; ch < gh; ++ch) {
      for (const int64_t j : cycle) units.push_back(j * gh + ch);
    }
  }
  return units;
}

// Bit c of the result: cells[c] != 0, for n <= 64 cells; eight cells at a time (a scalar loop of
// variable shifts was most of a 32 px call's time).
inline uint64_t cell_bits(const uint8_t* cells, int64_t n) {
  constexpr uint64_t kLow7 = 0x7F7F7F7F7F7F7F7Full, kHigh = 0x8080808080808080ull;
  uint64_t word = 0;
  for (int64_t c = 0; c < n; c += 8) {
    uint64_t v = 0;
    std::memcpy(&v, cells + c, static_cast<size_t>(std::min<int64_t>(8, n - c)));
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);  // cell c + k in byte k
#endif
    const uint64_t nonzero = ((((v & kLow7) + kLow7) | v) & kHigh) >> 7;  // byte k: 1 where cell c + k != 0
    word |= ((nonzero * 0x0102040810204080ull) >> 56) << c;  // byte k's bit to bit k
  }
  return word;
}

bool is_involution(const int64_t* src, int64_t B) {
  for (int64_t b = 0; b < B; ++b) {
    if (src[src[b]] != b) return false;
  }
  return true;
}

// The work units of an involution's pairs: the first row b <= src[b] of each, each group of cell rows.
std::vector<int64_t> pair_units(const int64_t* src, int64_t B, int64_t groups) {
  std::vector<int64_t> units;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t k = 0; k < groups && b <= src[b]; ++k) units.push_back(b * groups + k);
  }
  return units;
}

template <typename T>
void cell_select(const T* x, T* out, const int64_t* src, const int64_t* mask_row, const uint8_t* mask,
                 const PatchSwapGeometry& geometry, bool forward) {
  using U = cpu::Bits<T>;
  const cpu::SelectLoops<U> loops = cpu::select_loops<U>();
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
  const bool by_runs = (W / gw) * pix * static_cast<int64_t>(sizeof(T)) >= kMinCopyRunBytes;
  const int64_t rows_per_unit = (H + gh - 1) / gh;  // image rows per cell row, at most
  // Work unit: a group of consecutive cell rows of sample b, i.e. image rows [h0, h1) (one cell row
  // where cells are copied run by run, up to kSelectUnitElements a plane on the select path). Those
  // rows are contiguous in memory (within a plane in NCHW, within the sample in channels_last), so
  // the select path handles a whole unit in one vectorised call under one mask.
  std::vector<int64_t> row0(gh + 1);  // first image row of each cell row
  for (int64_t ch = 0; ch <= gh; ++ch) row0[ch] = (ch * H + gh - 1) / gh;
  const int64_t group =
      by_runs ? 1 : std::max<int64_t>(1, std::min<int64_t>(gh, kSelectUnitElements / (rows_per_unit * row_len)));
  const int64_t groups = (gh + group - 1) / group;
  // The select path's masks are cells' bits expanded in vectorised passes, by each element's bit in
  // a word of the cells of word_rows cell rows: one pass per word where every cell row has the same
  // image rows (a 32 px image with an 8 x 8 grid: two words of four cell rows), else one per cell row.
  const int64_t word_rows = std::max<int64_t>(1, kWordBits / gw);
  const bool unit_words = !by_runs && H % gh == 0 && gw <= kWordBits;
  const int64_t table_rows = unit_words ? group * rows_per_unit : rows_per_unit;
  std::vector<uint32_t> cell_of(by_runs ? 0 : table_rows * row_len);
  for (int64_t cw = 0; cw < gw && !by_runs; ++cw) {
    for (int64_t r = 0; r < table_rows; ++r) {
      const auto cell = static_cast<uint32_t>((r / rows_per_unit % word_rows) * gw + cw);  // bit of its word
      for (int64_t e = col[cw] * pix; e < col[cw + 1] * pix; ++e) cell_of[r * row_len + e] = cell;
    }
  }
  // An involution partner (fastsd's pairs, timm's flip; the backward's src is then partner too):
  // both rows of a pair in one unit (pair_units), whose outputs the forward, and the backward where
  // the pair's cells are the same, write from one read of both rows; else units in cycle order.
  const bool pairs = is_involution(src, B);
  const std::vector<int64_t> units = pairs ? pair_units(src, B, groups) : cycle_order(src, B, groups);
  const int64_t grain = std::max<int64_t>(
      1, 32768 / std::max<int64_t>(1, (pairs ? 2 : 1) * group * rows_per_unit * row_len * planes));

  at::parallel_for(0, static_cast<int64_t>(units.size()), grain, [&](int64_t begin, int64_t end) {
    // (-fno-strict-aliasing: locals, not captured references, keep these in registers.)
    const int64_t ngw = gw, ngh = gh, ngroups = groups, nrow = row_len, nplanes = planes, pstride = plane_stride,
                  npix = pix;
    const int64_t* cols = col.data();
    const int64_t* rows = row0.data();
    // Select path: keep / take bits of one unit's image rows.
    // (The forward reads take bits only: keep == !take there.)
    const int64_t unit_len = group * rows_per_unit * nrow;
    std::vector<U> keep_bits(by_runs || (forward && !pairs) ? 0 : unit_len);  // (pairs: the partner's take)
    std::vector<U> take_bits(by_runs ? 0 : unit_len);
    std::vector<U> keep_cell(ngw), take_cell(ngw);  // grids wider than one bit word
    U* keep_row = keep_bits.data();
    U* take_row = take_bits.data();
    // Whether the unit's cells of row b all make one choice (k0: keep, t0: take).
    auto uniform = [&](int64_t b, int64_t ch0, int64_t ch1, bool& k0, bool& t0) {
      const uint8_t* own_mask = mask + b * ngh * ngw;
      const uint8_t* other_mask = mask + mask_row[b] * ngh * ngw;
      k0 = own_mask[ch0 * ngw] == 0;
      t0 = other_mask[ch0 * ngw] != 0;
      int differ = 0;  // (no early exit: the compiler vectorises the test over the unit's cells)
      for (int64_t c = ch0 * ngw; c < ch1 * ngw; ++c) {
        differ |= ((own_mask[c] == 0) != k0) | ((other_mask[c] != 0) != t0);
      }
      return !differ;
    };
    // The take (forward) or keep / take (backward) lanes of row b's cell rows [ch0, ch1), from the
    // cells' bits, cell row by cell row, at take / keep.
    auto expand = [&](int64_t b, int64_t ch0, int64_t ch1, U* take, U* keep) {
      const uint8_t* own_mask = mask + b * ngh * ngw;
      const uint8_t* other_mask = mask + mask_row[b] * ngh * ngw;
      const uint32_t* cells = cell_of.data();
      for (int64_t ch = ch0; unit_words && ch < ch1; ch += word_rows) {
        const int64_t ce = std::min(ch + word_rows, ch1), nc = (ce - ch) * ngw;
        const int64_t at = (rows[ch] - rows[ch0]) * nrow, n = (rows[ce] - rows[ch]) * nrow;
        loops.expand(take + at, cells + at, static_cast<uint32_t>(cell_bits(other_mask + ch * ngw, nc)), n);
        if (keep != nullptr) {
          loops.expand(keep + at, cells + at, ~static_cast<uint32_t>(cell_bits(own_mask + ch * ngw, nc)), n);
        }
      }
      if (unit_words) return;
      for (int64_t ch = ch0; ch < ch1; ++ch) {
        const uint8_t* own_cells = own_mask + ch * ngw;
        const uint8_t* other_cells = other_mask + ch * ngw;
        const int64_t at = (rows[ch] - rows[ch0]) * nrow, n = (rows[ch + 1] - rows[ch]) * nrow;
        if (ngw <= kWordBits) {  // bit cw: cell cw takes / keeps (expand reads bits 0 to ngw - 1)
          loops.expand(take + at, cells, static_cast<uint32_t>(cell_bits(other_cells, ngw)), n);
          if (keep != nullptr) loops.expand(keep + at, cells, ~static_cast<uint32_t>(cell_bits(own_cells, ngw)), n);
        } else {
          for (int64_t cw = 0; cw < ngw; ++cw) {
            keep_cell[cw] = own_cells[cw] == 0 ? U(~U(0)) : U(0);
            take_cell[cw] = other_cells[cw] != 0 ? U(~U(0)) : U(0);
          }
          const U* tc = take_cell.data();
          const U* kc = keep_cell.data();
          for (int64_t e = 0; e < n; ++e) take[at + e] = tc[cells[e]];
          for (int64_t e = 0; e < n && keep != nullptr; ++e) keep[at + e] = kc[cells[e]];
        }
      }
    };
    // Output row b's cell rows [ch0, ch1), from x[b] and x[src[b]].
    auto unit = [&](int64_t b, int64_t ch0, int64_t ch1) {
      const int64_t block = (rows[ch1] - rows[ch0]) * nrow;  // elements of the unit in one plane
      const uint8_t* own_mask = mask + b * ngh * ngw;
      const uint8_t* other_mask = mask + mask_row[b] * ngh * ngw;
      const int64_t self_base = b * sample + rows[ch0] * nrow;
      const int64_t other_base = src[b] * sample + rows[ch0] * nrow;
      bool k0, t0;
      if (uniform(b, ch0, ch1, k0, t0)) {  // one choice over the whole unit: one contiguous run per plane
        for (int64_t p = 0; p < nplanes; ++p) {
          const int64_t off = p * pstride;
          run(loops, out + self_base + off, x + self_base + off, x + other_base + off, k0, t0, block);
        }
        return;
      }
      if (by_runs) {  // one cell row (group == 1)
        const uint8_t* own_cells = own_mask + ch0 * ngw;
        const uint8_t* other_cells = other_mask + ch0 * ngw;
        for (int64_t p = 0; p < nplanes; ++p) {
          const T* self = x + self_base + p * pstride;
          const T* other = x + other_base + p * pstride;
          T* o = out + self_base + p * pstride;
          for (int64_t r = 0; r < block; r += nrow) {
            // merge neighbouring cells with the same choice into one longer run
            int64_t cw = 0;
            while (cw < ngw) {
              const bool k = own_cells[cw] == 0, t = other_cells[cw] != 0;
              int64_t stop = cw + 1;
              while (stop < ngw && (own_cells[stop] == 0) == k && (other_cells[stop] != 0) == t) ++stop;
              const int64_t a = r + cols[cw] * npix, n = (cols[stop] - cols[cw]) * npix;
              run(loops, o + a, self + a, other + a, k, t, n);
              cw = stop;
            }
          }
        }
        return;
      }
      expand(b, ch0, ch1, take_row, forward ? nullptr : keep_row);
      auto* o = reinterpret_cast<U*>(out + self_base);
      auto* s = reinterpret_cast<const U*>(x + self_base);
      auto* t = reinterpret_cast<const U*>(x + other_base);
      if (forward) {
        loops.take(o, s, t, take_row, block, nplanes, pstride);
        return;
      }
      loops.bits(o, s, t, keep_row, take_row, block, nplanes, pstride);
      // cells where both hold (backward only): s + t, not the select's OR
      for (int64_t ch = ch0; ch < ch1; ++ch) {
        for (int64_t cw = 0; cw < ngw; ++cw) {
          if (own_mask[ch * ngw + cw] != 0 || other_mask[ch * ngw + cw] == 0) continue;
          for (int64_t p = 0; p < nplanes; ++p) {
            const T* self = x + self_base + p * pstride;
            const T* other = x + other_base + p * pstride;
            T* op = out + self_base + p * pstride;
            for (int64_t r = (rows[ch] - rows[ch0]) * nrow; r < (rows[ch + 1] - rows[ch0]) * nrow; r += nrow) {
              for (int64_t e = r + cols[cw] * npix; e < r + cols[cw + 1] * npix; ++e) op[e] = self[e] + other[e];
            }
          }
        }
      }
    };
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = units[i] / ngroups, ch0 = (units[i] % ngroups) * group;
      const int64_t ch1 = std::min(ch0 + group, ngh);
      const int64_t j = src[b];
      bool k0, t0;
      if (!pairs || j == b || by_runs || (uniform(b, ch0, ch1, k0, t0) && uniform(j, ch0, ch1, k0, t0))) {
        unit(b, ch0, ch1);
        if (pairs && j != b) unit(j, ch0, ch1);
        continue;
      }
      // A pair on the select path: out[b] = take_b ? x[j] : x[b] and out[j] = take_j ? x[b] : x[j],
      // both from one read of x[b] and x[j]. Where the pair's cells are the same (patch_swap_mask
      // draws one mask a pair), one mask: the swap loop; in the backward too, as keep = !take there
      // (take_b = mask[j] = mask[b]). Else the forward's pair loop, each row under its own mask (every
      // plane is under both, blocks [0, nplanes): its mask of none is never read), or the backward's
      // units one row at a time (a cell may keep and take, or neither).
      const int64_t block = (rows[ch1] - rows[ch0]) * nrow;
      const int64_t bi = b * sample + rows[ch0] * nrow, bj = j * sample + rows[ch0] * nrow;
      const int64_t ncells = (ch1 - ch0) * ngw;
      const bool same_cells = std::memcmp(mask + (b * ngh + ch0) * ngw, mask + (j * ngh + ch0) * ngw, ncells) == 0;
      if (!same_cells && !forward) {
        unit(b, ch0, ch1);
        unit(j, ch0, ch1);
        continue;
      }
      expand(b, ch0, ch1, take_row, nullptr);
      if (same_cells) {
        loops.swap(reinterpret_cast<U*>(out + bi), reinterpret_cast<U*>(out + bj), reinterpret_cast<const U*>(x + bi),
                   reinterpret_cast<const U*>(x + bj), take_row, block, nplanes, pstride);
        continue;
      }
      expand(j, ch0, ch1, keep_row, nullptr);
      loops.pair(reinterpret_cast<U*>(out + bi), reinterpret_cast<U*>(out + bj), reinterpret_cast<const U*>(x + bi),
                 reinterpret_cast<const U*>(x + bj), take_row, keep_row, take_row, 0, nplanes, 0, nplanes, block,
                 nplanes, pstride);
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
