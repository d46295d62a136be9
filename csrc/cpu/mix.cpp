// CPU kernel of mix (csrc/mix.cpp), parallel over image planes with at::parallel_for.
//
// Work unit: one plane (NCHW: channel c of a sample; channels_last: the whole sample) of a pair of
// rows that are each other's partner (both outputs written from one read of both rows), or of a row
// in no pair. In place, a unit is a pair's plane too (an involution partner is required).
// * CutMix rows: every image row of the plane is at most three runs (left of the box from x[b],
//   the box from x[partner[b]], right of it from x[b]), and the rows above and below the box are
//   one contiguous run each: memcpy'd, or short rows (<= 256 bytes) a vectorised bit select.
// * MixUp rows: one elementwise pass `s * w1 + t * w2`, compiled without FMA contraction (it would
//   round once where PyTorch's eager mul and add round twice) and vectorised per instruction set
//   (AVX-512, AVX2, baseline); a MixUp pair converts each source element once for both outputs.
// * A pair of short rows (64 to 256 bytes) is one pass over both sources whatever its kinds: a CutMix
//   pair a select of each, a CutMix row and a MixUp row the select and the blend side by side.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../mix.h"
#include "alloc.h"
#include "capability.h"
#include "select.h"

namespace fastsd {
namespace {

// 1.5 * 2^23: (v + kRound) - kRound rounds a float in [0, 2^22] to an integer, half to even (the
// default rounding mode), as torch.round does, in a form the compiler vectorises.
constexpr float kRound = 12582912.0f;

// The MixUp loops must round each product before the sum, as torch's eager `x * w1 + y * w2` does:
// no contraction into FMA, which GCC does by default (-ffp-contract=fast) wherever the target has
// it, AVX-512F included; clang and icx (-ffp-contract=fast) and MSVC can too. tests/test_mix.py
// checks the loops bit for bit on the widest path of the machine, and `make test-avx2` on AVX2.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#elif defined(_MSC_VER)
#pragma fp_contract(off)
#endif

// The rounded result of a blend in the element type: uint8 rounds half to even (timm's np.rint,
// torch.round; v is in [0, 255] as lam is in [0, 1]), the others cast.
template <typename T, typename W>
inline T finish(W v) {
  return static_cast<T>(v);
}
template <>
inline uint8_t finish<uint8_t, float>(float v) {
  return static_cast<uint8_t>(static_cast<int32_t>((v + kRound) - kRound));
}

// The MixUp passes per element type, in the compute type W (float for uint8): one output
// (o = s * w1 + t * w2), or both outputs of a pair of MixUp rows (o1 = s * a1 + t * a2,
// o2 = t * b1 + s * b2) from one read and one conversion of each source element.
#define FASTSD_MIX_LOOPS(ISA, ATTRIBUTES)                                                                  \
  namespace ISA {                                                                                        \
  template <typename T, typename W>                                                                      \
  ATTRIBUTES void mixup(T* __restrict o, const T* __restrict s, const T* __restrict t, W w1, W w2,       \
                        int64_t n) {                                                                     \
    for (int64_t e = 0; e < n; ++e) {                                                                    \
      const W a = static_cast<W>(s[e]) * w1;                                                             \
      const W b = static_cast<W>(t[e]) * w2;                                                             \
      o[e] = finish<T, W>(a + b);                                                                        \
    }                                                                                                    \
  }                                                                                                      \
  template <typename T, typename W>                                                                      \
  ATTRIBUTES void mixup_pair(T* __restrict o1, T* __restrict o2, const T* __restrict s,                  \
                             const T* __restrict t, W a1, W a2, W b1, W b2, int64_t n) {                 \
    for (int64_t e = 0; e < n; ++e) {                                                                    \
      const W u = static_cast<W>(s[e]), v = static_cast<W>(t[e]);                                        \
      const W p = u * a1, q = v * a2, r = v * b1, z = u * b2;                                            \
      o1[e] = finish<T, W>(p + q);                                                                       \
      o2[e] = finish<T, W>(r + z);                                                                       \
    }                                                                                                    \
  }                                                                                                      \
  template <typename T, typename W, typename U>                                                          \
  ATTRIBUTES void cut_mixup_pair(T* __restrict oc, T* __restrict om, const T* __restrict s,              \
                                 const T* __restrict t, const U* __restrict take, const U* __restrict none, \
                                 int64_t lo, int64_t hi, W w1, W w2, int64_t n, int64_t count,           \
                                 int64_t stride) {                                                       \
    for (int64_t c = 0; c < count; ++c, oc += stride, om += stride, s += stride, t += stride) {          \
      const U* __restrict m = lo <= c && c < hi ? take : none;                                           \
      const U* __restrict su = reinterpret_cast<const U*>(s);                                            \
      const U* __restrict tu = reinterpret_cast<const U*>(t);                                            \
      U* __restrict ou = reinterpret_cast<U*>(oc);                                                       \
      for (int64_t e = 0; e < n; ++e) {                                                                  \
        ou[e] = (su[e] & ~m[e]) | (tu[e] & m[e]);                                                        \
        const W a = static_cast<W>(t[e]) * w1;                                                           \
        const W b = static_cast<W>(s[e]) * w2;                                                           \
        om[e] = finish<T, W>(a + b);                                                                     \
      }                                                                                                  \
    }                                                                                                    \
  }                                                                                                      \
  }

#if defined(FASTSD_MULTI_ISA)
FASTSD_MIX_LOOPS(avx512, __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2"))))
FASTSD_MIX_LOOPS(avx2, __attribute__((target("avx2"))))
#endif
FASTSD_MIX_LOOPS(baseline, )
#undef FASTSD_MIX_LOOPS

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// Image rows up to this many bytes take a vectorised bit select over the box rows, where three
// memcpy calls a row would cost more than the bytes they move (32 px uint8: 32-byte rows).
constexpr int64_t kMaxSelectRowBytes = 256;

// The compute type of the MixUp passes: float for uint8 (timm's FastCollateMixup), else T.
template <typename T>
using Compute = std::conditional_t<std::is_same_v<T, uint8_t>, float, T>;

// o = s * w1 + t * w2 on the vector path in use (float32, float64, uint8).
template <typename T>
void mixup_row(T* o, const T* s, const T* t, double w1, double w2, int64_t n, cpu::Isa isa) {
  using W = Compute<T>;
  const W a = static_cast<W>(w1), b = static_cast<W>(w2);
#if defined(FASTSD_MULTI_ISA)
  if (isa == cpu::Isa::kAvx512) return avx512::mixup<T, W>(o, s, t, a, b, n);
  if (isa == cpu::Isa::kAvx2) return avx2::mixup<T, W>(o, s, t, a, b, n);
#endif
  baseline::mixup<T, W>(o, s, t, a, b, n);
}

// Both outputs of a pair of MixUp rows (s = x[i], t = x[j]), on the vector path in use.
template <typename T>
void mixup_pair(T* o1, T* o2, const T* s, const T* t, double a1, double a2, double b1, double b2, int64_t n,
                cpu::Isa isa) {
  using W = Compute<T>;
  const W c1 = static_cast<W>(a1), c2 = static_cast<W>(a2), d1 = static_cast<W>(b1), d2 = static_cast<W>(b2);
#if defined(FASTSD_MULTI_ISA)
  if (isa == cpu::Isa::kAvx512) return avx512::mixup_pair<T, W>(o1, o2, s, t, c1, c2, d1, d2, n);
  if (isa == cpu::Isa::kAvx2) return avx2::mixup_pair<T, W>(o1, o2, s, t, c1, c2, d1, d2, n);
#endif
  baseline::mixup_pair<T, W>(o1, o2, s, t, c1, c2, d1, d2, n);
}

// float16 / bfloat16: PyTorch computes each eager op in float32 and rounds its result to the
// dtype, so the products are rounded to T before the sum, and the sum again.
template <typename T>
T blend_reduced(float u, float v, float w1, float w2) {
  const T a = static_cast<T>(u * w1);
  const T b = static_cast<T>(v * w2);
  return static_cast<T>(static_cast<float>(a) + static_cast<float>(b));
}

template <typename T>
void mixup_reduced(T* o, const T* s, const T* t, double w1, double w2, int64_t n) {
  const float a1 = static_cast<float>(w1), a2 = static_cast<float>(w2);
  for (int64_t e = 0; e < n; ++e) o[e] = blend_reduced<T>(s[e], t[e], a1, a2);
}

template <typename T>
void mixup_pair_reduced(T* o1, T* o2, const T* s, const T* t, double a1, double a2, double b1, double b2,
                        int64_t n) {
  const float c1 = static_cast<float>(a1), c2 = static_cast<float>(a2);
  const float d1 = static_cast<float>(b1), d2 = static_cast<float>(b2);
  for (int64_t e = 0; e < n; ++e) {
    const float u = s[e], v = t[e];
    o1[e] = blend_reduced<T>(u, v, c1, c2);
    o2[e] = blend_reduced<T>(v, u, d1, d2);
  }
}

template <>
void mixup_row(at::Half* o, const at::Half* s, const at::Half* t, double w1, double w2, int64_t n, cpu::Isa) {
  mixup_reduced(o, s, t, w1, w2, n);
}
template <>
void mixup_row(at::BFloat16* o, const at::BFloat16* s, const at::BFloat16* t, double w1, double w2, int64_t n,
               cpu::Isa) {
  mixup_reduced(o, s, t, w1, w2, n);
}
template <>
void mixup_pair(at::Half* o1, at::Half* o2, const at::Half* s, const at::Half* t, double a1, double a2, double b1,
                double b2, int64_t n, cpu::Isa) {
  mixup_pair_reduced(o1, o2, s, t, a1, a2, b1, b2, n);
}
template <>
void mixup_pair(at::BFloat16* o1, at::BFloat16* o2, const at::BFloat16* s, const at::BFloat16* t, double a1,
                double a2, double b1, double b2, int64_t n, cpu::Isa) {
  mixup_pair_reduced(o1, o2, s, t, a1, a2, b1, b2, n);
}

// A pair of one CutMix row and one MixUp row (s = x[cut row], t = x[mixup row]) in one pass over both
// sources, count blocks of n elements stride apart (the image rows of a plane): the CutMix output is
// the select of t's bits where take is set (block c in [lo, hi), the box's image rows; else none, a
// copy of s), the MixUp output t * w1 + s * w2. On the vector path in use; float16 / bfloat16 blend
// as blend_reduced, an element at a time.
template <typename T>
void cut_mixup_pair(T* oc, T* om, const T* s, const T* t, const cpu::Bits<T>* take, const cpu::Bits<T>* none,
                    int64_t lo, int64_t hi, double w1, double w2, int64_t n, int64_t count, int64_t stride,
                    cpu::Isa isa) {
  using U = cpu::Bits<T>;
  if constexpr (std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>) {
    const float a = static_cast<float>(w1), b = static_cast<float>(w2);
    for (int64_t c = 0; c < count; ++c, oc += stride, om += stride, s += stride, t += stride) {
      const U* m = lo <= c && c < hi ? take : none;
      for (int64_t e = 0; e < n; ++e) {
        reinterpret_cast<U*>(oc)[e] = m[e] ? reinterpret_cast<const U*>(t)[e] : reinterpret_cast<const U*>(s)[e];
        om[e] = blend_reduced<T>(t[e], s[e], a, b);
      }
    }
  } else {
    using W = Compute<T>;
    const W a = static_cast<W>(w1), b = static_cast<W>(w2);
#if defined(FASTSD_MULTI_ISA)
    auto loop = &baseline::cut_mixup_pair<T, W, U>;
    if (isa == cpu::Isa::kAvx512) loop = &avx512::cut_mixup_pair<T, W, U>;
    if (isa == cpu::Isa::kAvx2) loop = &avx2::cut_mixup_pair<T, W, U>;
#else
    auto loop = &baseline::cut_mixup_pair<T, W, U>;
#endif
    loop(oc, om, s, t, take, none, lo, hi, a, b, n, count, stride);
  }
}

// Exchanges n elements of a and b (bit patterns, vectorised): a pair of rows whose boxes share their
// columns, as in timm's 'batch' mode, swaps its box segments in one pass rather than three memcpy
// calls through a buffer.
template <typename T>
void swap_segment(T* a, T* b, int64_t n) {
  using U = cpu::Bits<T>;
  U* __restrict ua = reinterpret_cast<U*>(a);
  U* __restrict ub = reinterpret_cast<U*>(b);
  for (int64_t e = 0; e < n; ++e) {
    const U t = ua[e];
    ua[e] = ub[e];
    ub[e] = t;
  }
}

// Out of place. Work unit: one plane of a pair (i, j = partner[i], partner[j] == i, i < j: timm's
// flip, any involution) or of a row whose partner is not its partner's partner (or is itself). A
// pair's two outputs are written chunk by chunk (a few KiB of image rows), both from the same two
// source chunks, so each source byte comes from memory once: the second output reads it from L1.
// A pair of MixUp rows is one pass that converts each source element once for both outputs.
template <typename T>
void mix_kernel(const T* x, T* out, const int64_t* partner, const int64_t* boxes, const double* w1,
                const double* w2, const bool* use_box, const MixGeometry& g, const std::vector<int64_t>& firsts) {
  constexpr int64_t kChunkBytes = 4096;
  const int64_t pix = g.channels_last ? g.C : 1;     // elements per pixel in an image row
  const int64_t planes = g.channels_last ? 1 : g.C;  // units per sample
  const int64_t row_len = g.W * pix;
  const int64_t plane = g.H * row_len;
  const int64_t sample = g.C * g.H * g.W;
  const int64_t chunk_rows = std::max<int64_t>(1, kChunkBytes / (row_len * static_cast<int64_t>(sizeof(T))));
  const cpu::Isa isa = cpu::cpu_isa();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, 2 * plane));
  using U = cpu::Bits<T>;
  const cpu::SelectLoops<U> select = cpu::select_loops<U>();
  const int64_t row_bytes = row_len * static_cast<int64_t>(sizeof(T));
  const bool select_rows = row_bytes <= kMaxSelectRowBytes;
  // a CutMix pair, or a CutMix row and a MixUp row, in one pass, for rows of at least one AVX-512
  // vector (shorter ones spend their time in the loop's remainder: 32 px uint8 measured faster by
  // rows, select and memcpy)
  const bool select_pair = select_rows && row_bytes >= 64;
  const int64_t units = static_cast<int64_t>(firsts.size()) * planes;
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    // the box columns of each output row of a unit, then a mask of none (null over 256-byte rows)
    std::vector<U> masks(select_rows ? 3 * row_len : 0);
    U* const mask_i = select_rows ? masks.data() : nullptr;
    U* const mask_j = select_rows ? masks.data() + row_len : nullptr;
    U* const mask_none = select_rows ? masks.data() + 2 * row_len : nullptr;
    // Image rows [h0, h1) of row b's output plane o, from self (x[b]) and other (x[partner[b]]).
    auto emit = [&](int64_t b, T* o, const T* self, const T* other, const U* mask, int64_t h0, int64_t h1) {
      if (!use_box[b]) return mixup_row(o + h0 * row_len, self + h0 * row_len, other + h0 * row_len, w1[b], w2[b],
                                        (h1 - h0) * row_len, isa);
      const int64_t* box = boxes + 4 * b;
      const bool empty = box[0] == box[1] || box[2] == box[3];
      const int64_t y0 = empty ? h1 : std::clamp(box[0], h0, h1), y1 = empty ? h1 : std::clamp(box[1], h0, h1);
      const int64_t x0 = box[2] * pix, x1 = box[3] * pix;
      std::memcpy(o + h0 * row_len, self + h0 * row_len, (y0 - h0) * row_len * sizeof(T));  // above the box
      if (y0 < y1 && select_rows) {
        const int64_t r = y0 * row_len;
        select.take(reinterpret_cast<U*>(o + r), reinterpret_cast<const U*>(self + r),
                    reinterpret_cast<const U*>(other + r), mask, row_len, y1 - y0, row_len);
      } else {
        for (int64_t h = y0; h < y1; ++h) {
          const int64_t r = h * row_len;
          std::memcpy(o + r, self + r, x0 * sizeof(T));
          std::memcpy(o + r + x0, other + r + x0, (x1 - x0) * sizeof(T));
          std::memcpy(o + r + x1, self + r + x1, (row_len - x1) * sizeof(T));
        }
      }
      std::memcpy(o + y1 * row_len, self + y1 * row_len, (h1 - y1) * row_len * sizeof(T));  // below
    };
    auto fill_mask = [&](U* mask, int64_t b) {
      if (!select_rows || !use_box[b]) return;
      const int64_t* box = boxes + 4 * b;
      std::fill(mask, mask + row_len, U(0));
      std::fill(mask + box[2] * pix, mask + box[3] * pix, U(~U(0)));
    };
    int64_t mask_unit = -1;  // the pair (first row) whose masks the buffer holds
    for (int64_t u = begin; u < end; ++u) {
      const int64_t i = firsts[u / planes], j = partner[i], offset = (u % planes) * plane;
      const bool pair = j != i && partner[j] == i;
      const T* xi = x + i * sample + offset;
      const T* xj = x + j * sample + offset;
      T* oi = out + i * sample + offset;
      T* oj = out + j * sample + offset;
      if (mask_unit != i) {
        fill_mask(mask_i, i);
        if (pair) fill_mask(mask_j, j);
        mask_unit = i;
      }
      if (pair && !use_box[i] && !use_box[j]) {
        mixup_pair(oi, oj, xi, xj, w1[i], w2[i], w1[j], w2[j], plane, isa);
        continue;
      }
      if (pair && use_box[i] != use_box[j] && select_pair) {  // a CutMix row and a MixUp row: one pass
        const bool cut_i = use_box[i];
        const int64_t* box = boxes + 4 * (cut_i ? i : j);
        const int64_t m = cut_i ? j : i;
        cut_mixup_pair(cut_i ? oi : oj, cut_i ? oj : oi, cut_i ? xi : xj, cut_i ? xj : xi, cut_i ? mask_i : mask_j,
                       mask_none, box[0], box[1], w1[m], w2[m], row_len, g.H, row_len, isa);
        continue;
      }
      if (pair && use_box[i] && use_box[j] && select_pair) {  // a CutMix pair of short rows: one pass
        const int64_t* bi = boxes + 4 * i;
        const int64_t* bj = boxes + 4 * j;
        select.pair(reinterpret_cast<U*>(oi), reinterpret_cast<U*>(oj), reinterpret_cast<const U*>(xi),
                    reinterpret_cast<const U*>(xj), mask_i, mask_j, mask_none,
                    bi[0], bi[1], bj[0], bj[1], row_len, g.H, row_len);
        continue;
      }
      for (int64_t h0 = 0; h0 < g.H; h0 += chunk_rows) {
        const int64_t h1 = std::min(g.H, h0 + chunk_rows);
        emit(i, oi, xi, xj, mask_i, h0, h1);
        if (pair) emit(j, oj, xj, xi, mask_j, h0, h1);
      }
    }
  });
}

// In place, for an involution partner (timm's flip): each unit is one pair (i, j = partner[i]),
// i <= j, and one plane; both rows are read before either is written, so only the mixed pixels
// move: a CutMix row's box segments (image rows outside both boxes untouched), a MixUp row whole.
// The image rows of a pair split into at most five spans with the same box membership; a span
// without box segments is blended as one block (through a small buffer), a span with them row by
// row (a box segment is copied before the blend that reads its source overwrites it).
template <typename T>
void mix_inplace_kernel(T* x, const int64_t* partner, const int64_t* boxes, const double* w1, const double* w2,
                        const bool* use_box, const MixGeometry& g, const std::vector<int64_t>& firsts) {
  constexpr int64_t kBlock = 4096;  // elements per blended chunk (two buffers of it stay in L1/L2)
  const int64_t pix = g.channels_last ? g.C : 1;
  const int64_t planes = g.channels_last ? 1 : g.C;
  const int64_t row_len = g.W * pix;
  const int64_t plane = g.H * row_len;
  const int64_t sample = g.C * g.H * g.W;
  const cpu::Isa isa = cpu::cpu_isa();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, 2 * plane));
  const int64_t units = static_cast<int64_t>(firsts.size()) * planes;
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    const int64_t buf = std::max(row_len, kBlock);
    std::vector<T> tmp(2 * buf);
    T* t = tmp.data();
    T* t2 = t + buf;
    for (int64_t u = begin; u < end; ++u) {
      const int64_t i = firsts[u / planes], j = partner[i], offset = (u % planes) * plane;
      T* xi = x + i * sample + offset;
      T* xj = x + j * sample + offset;
      const bool mi = !use_box[i], mj = !use_box[j];
      if (i == j && !mi) continue;  // its own partner's box: its own pixels
      const int64_t* bi = boxes + 4 * i;
      const int64_t* bj = boxes + 4 * j;
      // Blend n elements from ri / rj (whichever rows are MixUp rows), then write them back.
      auto blend = [&](T* ri, T* rj, int64_t n) {
        for (int64_t o = 0; o < n; o += buf) {
          const int64_t len = std::min(buf, n - o);
          if (mi && mj && i != j) {
            mixup_pair(t, t2, ri + o, rj + o, w1[i], w2[i], w1[j], w2[j], len, isa);
          } else if (mi) {
            mixup_row(t, ri + o, rj + o, w1[i], w2[i], len, isa);
          } else if (mj && i != j) {
            mixup_row(t2, rj + o, ri + o, w1[j], w2[j], len, isa);
          }
          if (mi) std::memcpy(ri + o, t, len * sizeof(T));
          if (mj && i != j) std::memcpy(rj + o, t2, len * sizeof(T));
        }
      };
      // the box segment [x0, x1) of an image row, from src to dst
      auto copy = [&](T* dst, const T* src, const int64_t* box) {
        std::memcpy(dst + box[2] * pix, src + box[2] * pix, (box[3] - box[2]) * pix * sizeof(T));
      };
      int64_t cuts[6] = {0, g.H, 0, 0, 0, 0};
      int64_t ncuts = 2;
      for (const int64_t* b : {bi, bj}) {
        if (b[2] < b[3]) {
          cuts[ncuts++] = b[0];
          cuts[ncuts++] = b[1];
        }
      }
      for (int64_t a = 1; a < ncuts; ++a) {  // insertion sort of at most six row indices
        for (int64_t b = a; b > 0 && cuts[b - 1] > cuts[b]; --b) std::swap(cuts[b - 1], cuts[b]);
      }
      for (int64_t k = 0; k + 1 < ncuts; ++k) {
        const int64_t h0 = cuts[k], h1 = cuts[k + 1];
        if (h0 == h1) continue;
        const bool in_i = !mi && bi[0] <= h0 && h0 < bi[1] && bi[2] < bi[3];
        const bool in_j = !mj && bj[0] <= h0 && h0 < bj[1] && bj[2] < bj[3];
        T* si = xi + h0 * row_len;
        T* sj = xj + h0 * row_len;
        if (!in_i && !in_j) {
          if (mi || mj) blend(si, sj, (h1 - h0) * row_len);
          continue;
        }
        const bool same_columns = in_i && in_j && bi[2] == bj[2] && bi[3] == bj[3];
        if (same_columns && bi[2] == 0 && bi[3] == g.W) {  // whole image rows: one contiguous span
          swap_segment(si, sj, (h1 - h0) * row_len);
          continue;
        }
        for (int64_t r = 0; r < (h1 - h0) * row_len; r += row_len) {
          T* ri = si + r;
          T* rj = sj + r;
          if (mi) {  // j is a box row in its box
            mixup_row(t, ri, rj, w1[i], w2[i], row_len, isa);
            copy(rj, ri, bj);
            std::memcpy(ri, t, row_len * sizeof(T));
          } else if (mj) {
            mixup_row(t, rj, ri, w1[j], w2[j], row_len, isa);
            copy(ri, rj, bi);
            std::memcpy(rj, t, row_len * sizeof(T));
          } else if (same_columns) {
            swap_segment(ri + bi[2] * pix, rj + bi[2] * pix, (bi[3] - bi[2]) * pix);
          } else if (in_i && in_j) {
            copy(t, ri, bj);  // i's pixels under j's box, before i's box overwrites them
            copy(ri, rj, bi);
            copy(rj, t, bj);
          } else if (in_i) {
            copy(ri, rj, bi);
          } else {
            copy(rj, ri, bj);
          }
        }
      }
    }
  });
}

// Checks what the kernels read (the public functions check it on the device; this keeps the
// kernels in bounds whatever the caller skipped) and returns (w1, w2) = (lam, 1 - lam), the
// difference taken in lam's dtype (timm's float32 per-element lambdas, its float64 per-batch one),
// then widened without rounding.
struct MixArgs {
  MixGeometry g;
  at::Tensor partner, boxes, use_box;
  std::vector<double> w1, w2;
};

MixArgs mix_args(const at::Tensor& x, const at::Tensor& partner, const at::Tensor& boxes, const at::Tensor& lam,
                 const at::Tensor& use_box, bool involution) {
  const MixGeometry g = mix_geometry(x, partner, boxes, lam, use_box, involution ? "fastsd_C.mix_" : "fastsd_C.mix");
  const int64_t B = g.B;
  TORCH_CHECK(x.device().is_cpu() && partner.device().is_cpu() && boxes.device().is_cpu() &&
                  lam.device().is_cpu() && use_box.device().is_cpu(),
              "fastsd_C.mix (CPU): all tensors must be on the CPU");
  MixArgs a{g, partner.contiguous(), boxes.contiguous(), use_box.contiguous(), std::vector<double>(B),
            std::vector<double>(B)};
  const int64_t* pp = a.partner.data_ptr<int64_t>();
  const int64_t* bp = a.boxes.data_ptr<int64_t>();
  std::vector<double>& w1 = a.w1;
  std::vector<double>& w2 = a.w2;
  const at::Tensor l = lam.contiguous();
  for (int64_t i = 0; i < B; ++i) {
    TORCH_CHECK_VALUE(pp[i] >= 0 && pp[i] < B, "fastsd.mix: partner[", i, "] = ", pp[i], " is not in [0, B=", B, ")");
    const int64_t* box = bp + 4 * i;
    TORCH_CHECK_VALUE(0 <= box[0] && box[0] <= box[1] && box[1] <= g.H && 0 <= box[2] && box[2] <= box[3] &&
                          box[3] <= g.W,
                      "fastsd.mix: boxes[", i, "] = (", box[0], ", ", box[1], ", ", box[2], ", ", box[3],
                      ") must satisfy 0 <= y0 <= y1 <= H=", g.H, " and 0 <= x0 <= x1 <= W=", g.W);
    if (l.scalar_type() == at::kFloat) {
      const float v = l.data_ptr<float>()[i];
      w1[i] = v;
      w2[i] = 1.0f - v;
    } else {
      const double v = l.data_ptr<double>()[i];
      w1[i] = v;
      w2[i] = 1.0 - v;
    }
  }
  for (int64_t i = 0; involution && i < B; ++i) {
    TORCH_CHECK_VALUE(pp[pp[i]] == i, "fastsd.mix_: partner must be an involution (partner[partner[i]] == i), as "
                      "an in-place mix reads each pair before writing it; partner[", i, "] = ", pp[i]);
  }
  return a;
}

// The work units' rows: the first row of each pair (i < partner[i], partner[partner[i]] == i) and
// every row that is in no pair (its own partner, or its partner's partner is another row).
std::vector<int64_t> pair_firsts(const int64_t* partner, int64_t B) {
  std::vector<int64_t> firsts;
  for (int64_t i = 0; i < B; ++i) {
    if (!(partner[i] < i && partner[partner[i]] == i)) firsts.push_back(i);
  }
  return firsts;
}

at::Tensor mix_cpu(const at::Tensor& x, const at::Tensor& partner, const at::Tensor& boxes, const at::Tensor& lam,
                   const at::Tensor& use_box) {
  const MixArgs a = mix_args(x, partner, boxes, lam, use_box, /*involution=*/false);
  at::Tensor out = cpu::empty(x.sizes(), x.options(), mix_out_format(a.g));
  if (x.numel() == 0) return out;
  const int64_t* pp = a.partner.data_ptr<int64_t>();
  const std::vector<int64_t> firsts = pair_firsts(pp, a.g.B);
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, x.scalar_type(), "mix_cpu", [&] {
    mix_kernel<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), pp, a.boxes.data_ptr<int64_t>(),
                         a.w1.data(), a.w2.data(), a.use_box.data_ptr<bool>(), a.g, firsts);
  });
  return out;
}

void mix_inplace_cpu(const at::Tensor& x, const at::Tensor& partner, const at::Tensor& boxes, const at::Tensor& lam,
                     const at::Tensor& use_box) {
  const MixArgs a = mix_args(x, partner, boxes, lam, use_box, /*involution=*/true);
  if (x.numel() == 0) return;
  const int64_t* pp = a.partner.data_ptr<int64_t>();
  const std::vector<int64_t> firsts = pair_firsts(pp, a.g.B);
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, x.scalar_type(), "mix_inplace_cpu", [&] {
    mix_inplace_kernel<scalar_t>(x.data_ptr<scalar_t>(), pp, a.boxes.data_ptr<int64_t>(), a.w1.data(), a.w2.data(),
                                 a.use_box.data_ptr<bool>(), a.g, firsts);
  });
}

}  // namespace
}  // namespace fastsd

TORCH_LIBRARY_IMPL(fastsd_C, CPU, m) {
  m.impl("mix", &fastsd::mix_cpu);
  m.impl("mix_", &fastsd::mix_inplace_cpu);
}
