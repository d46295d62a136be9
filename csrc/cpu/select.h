// Bit-exact selects between two sources under a lane mask, and a plain copy, one version per
// vector path.
//
// Used where an image row mixes two sources in short segments (mix's CutMix box rows, patch
// swap's small cells): a branch-free select over whole rows costs less than a memcpy call per
// segment. The select works on same-width unsigned integers, so NaN payloads and -0.0 are copied
// as they are (bits, never arithmetic). The loops are plain C++ that the compiler vectorises;
// __restrict and plain arguments let it (csrc is built with -fno-strict-aliasing for the bit
// casts, so without them every store could alias every loaded bound). One copy per vector path
// (capability.h), picked at run time by select_loops().
#pragma once

#include <cstdint>
#include <type_traits>

#include "capability.h"

namespace fastsd {
namespace cpu {

// Same-width unsigned integer of an element type.
template <typename T>
using Bits = std::conditional_t<sizeof(T) == 1, uint8_t,
                                std::conditional_t<sizeof(T) == 2, uint16_t,
                                                   std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>>;

// count blocks of n elements, stride elements apart, all under the same mask(s) of n elements:
//   take:  o = (s & ~take) | (t & take)        (a copy from one source or the other)
//   bits:  o = (s & keep) | (t & take)         (either, both (OR; callers fix those up), neither)
//   expand: m[e] = bit shift[e] of word, widened to all ones or all zeros   (building such masks)
//   pair:  both outputs of a pair of rows that take box segments from each other (mix's CutMix
//          pairs): o1 = (s & ~m1) | (t & m1), o2 = (t & ~m2) | (s & m2), one read of s and t;
//          block c takes mask mk = take_k where c is in [lo_k, hi_k), else none (a copy)
//   swap:  both outputs of a pair of rows under one mask (patch swap's pairs, whose cells are the
//          same): d = (s ^ t) & take, o1 = s ^ d, o2 = t ^ d; one mask read, not two
//   copy:  o = s & ones, with ones all ones: a copy. It is a loop, not memcpy, because glibc's
//          memmove took 1.5x this loop's perf samples over the same bytes, patch swap's 4 KiB
//          blocks of uniform cell rows (an AMD EPYC, glibc 2.36; its `rep movsb` path, and with
//          glibc.cpu.x86_rep_movsb_threshold raised its vector loop alike: the cause is not
//          known, so re-measure on other CPUs and C libraries). An empty asm makes ones opaque,
//          so that no compiler folds s & ones into s and the loop back into a memcpy call
// (a box's image rows: count = rows, stride = n = row_len; one tiled mask over C planes: stride =
// the plane size.)
// The compiler may not assume anything about v's value from here on (select_copy's ones).
#if defined(__GNUC__) || defined(__clang__)
#define FASTSD_OPAQUE(v) __asm__("" : "+r"(v))
#else
#define FASTSD_OPAQUE(v) ((void)0)
#endif

#define FASTSD_SELECT_LOOPS(ISA, ATTRIBUTES)                                                             \
  namespace ISA {                                                                                       \
  template <typename U>                                                                                 \
  ATTRIBUTES void select_take(U* __restrict o, const U* __restrict s, const U* __restrict t,            \
                              const U* __restrict take, int64_t n, int64_t count, int64_t stride) {     \
    for (int64_t c = 0; c < count; ++c, o += stride, s += stride, t += stride) {                        \
      for (int64_t e = 0; e < n; ++e) o[e] = (s[e] & ~take[e]) | (t[e] & take[e]);                      \
    }                                                                                                   \
  }                                                                                                     \
  template <typename U>                                                                                 \
  ATTRIBUTES void select_bits(U* __restrict o, const U* __restrict s, const U* __restrict t,            \
                              const U* __restrict keep, const U* __restrict take, int64_t n,            \
                              int64_t count, int64_t stride) {                                          \
    for (int64_t c = 0; c < count; ++c, o += stride, s += stride, t += stride) {                        \
      for (int64_t e = 0; e < n; ++e) o[e] = (s[e] & keep[e]) | (t[e] & take[e]);                       \
    }                                                                                                   \
  }                                                                                                     \
  template <typename U>                                                                                 \
  ATTRIBUTES void select_pair(U* __restrict o1, U* __restrict o2, const U* __restrict s,                \
                              const U* __restrict t, const U* __restrict take1, const U* __restrict take2, \
                              const U* __restrict none, int64_t lo1, int64_t hi1, int64_t lo2,          \
                              int64_t hi2, int64_t n, int64_t count, int64_t stride) {                  \
    for (int64_t c = 0; c < count; ++c, o1 += stride, o2 += stride, s += stride, t += stride) {         \
      const U* __restrict m1 = lo1 <= c && c < hi1 ? take1 : none;                                      \
      const U* __restrict m2 = lo2 <= c && c < hi2 ? take2 : none;                                      \
      for (int64_t e = 0; e < n; ++e) {                                                                 \
        const U a = s[e], b = t[e];                                                                     \
        o1[e] = (a & ~m1[e]) | (b & m1[e]);                                                             \
        o2[e] = (b & ~m2[e]) | (a & m2[e]);                                                             \
      }                                                                                                 \
    }                                                                                                   \
  }                                                                                                     \
  template <typename U>                                                                                 \
  ATTRIBUTES void select_swap(U* __restrict o1, U* __restrict o2, const U* __restrict s,                \
                              const U* __restrict t, const U* __restrict take, int64_t n, int64_t count, \
                              int64_t stride) {                                                         \
    for (int64_t c = 0; c < count; ++c, o1 += stride, o2 += stride, s += stride, t += stride) {         \
      for (int64_t e = 0; e < n; ++e) {                                                                 \
        const U a = s[e], b = t[e], d = (a ^ b) & take[e];                                              \
        o1[e] = a ^ d;                                                                                  \
        o2[e] = b ^ d;                                                                                  \
      }                                                                                                 \
    }                                                                                                   \
  }                                                                                                     \
  template <typename U>                                                                                 \
  ATTRIBUTES void select_copy(U* __restrict o, const U* __restrict s, U ones, int64_t n) {              \
    FASTSD_OPAQUE(ones);                                                                                \
    for (int64_t e = 0; e < n; ++e) o[e] = s[e] & ones;                                                 \
  }                                                                                                     \
  /* a mask of n lanes from the bits of word: lane e is all ones where bit shift[e] is set */           \
  template <typename U>                                                                                 \
  ATTRIBUTES void expand_bits(U* __restrict m, const uint32_t* __restrict shift, uint32_t word,         \
                              int64_t n) {                                                              \
    for (int64_t e = 0; e < n; ++e) m[e] = static_cast<U>(U(0) - U((word >> shift[e]) & 1u));          \
  }                                                                                                     \
  }

namespace select_isa {
#if defined(FASTSD_MULTI_ISA)
FASTSD_SELECT_LOOPS(avx512, __attribute__((target(FASTSD_TARGET_AVX512))))
FASTSD_SELECT_LOOPS(avx2, __attribute__((target(FASTSD_TARGET_AVX2))))
#endif
FASTSD_SELECT_LOOPS(baseline, )
}  // namespace select_isa
#undef FASTSD_SELECT_LOOPS

template <typename U>
struct SelectLoops {
  void (*take)(U*, const U*, const U*, const U*, int64_t, int64_t, int64_t);
  void (*bits)(U*, const U*, const U*, const U*, const U*, int64_t, int64_t, int64_t);
  void (*expand)(U*, const uint32_t*, uint32_t, int64_t);
  void (*pair)(U*, U*, const U*, const U*, const U*, const U*, const U*, int64_t, int64_t, int64_t, int64_t,
               int64_t, int64_t, int64_t);
  void (*copy)(U*, const U*, U, int64_t);
  void (*swap)(U*, U*, const U*, const U*, const U*, int64_t, int64_t, int64_t);
};

// One vector path's loops, in SelectLoops' order.
#define FASTSD_SELECT_TABLE(ISA, U)                                                                          \
  {&select_isa::ISA::select_take<U>, &select_isa::ISA::select_bits<U>, &select_isa::ISA::expand_bits<U>, \
   &select_isa::ISA::select_pair<U>, &select_isa::ISA::select_copy<U>, &select_isa::ISA::select_swap<U>}

// The loops of the vector path in use (cpu_isa()).
template <typename U>
SelectLoops<U> select_loops() {
#if defined(FASTSD_MULTI_ISA)
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return FASTSD_SELECT_TABLE(avx512, U);
    case Isa::kAvx2:
      return FASTSD_SELECT_TABLE(avx2, U);
    default:
      break;
  }
#endif
  return FASTSD_SELECT_TABLE(baseline, U);
}
#undef FASTSD_SELECT_TABLE
#undef FASTSD_OPAQUE

}  // namespace cpu
}  // namespace fastsd
