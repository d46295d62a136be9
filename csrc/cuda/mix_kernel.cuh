// The CUDA mix kernels' per-thread bodies and launch plan, free of torch so that the same code compiles
// for the GPU (mix.cu) and for the host (tests/test_cuda_mix_emulation.py runs every thread of a
// launch on the CPU against the reference). mix_ops.cpp is the torch op: checks, device guard, stream,
// the plan, the launch.
//
// Same formula as csrc/cpu/mix.cpp and fastsd.reference.mix, per row b with p = partner[b]:
//   use_box[b] (CutMix): out[b] = x[p] inside boxes[b] = (y0, y1, x0, x1), x[b] outside;
//   else (MixUp):        out[b] = x[b] * w1 + x[p] * w2,  (w1, w2) = (lam[b], 1 - lam[b]),
// 1 - lam taken in lam's dtype, both weights in the compute type (float64 for float64 x, else
// float32); each product and the sum rounded as PyTorch's eager ops round them (the _rn intrinsics:
// never contracted into an FMA); float16 / bfloat16 round each product and the sum to x's dtype;
// uint8 rounds the float32 sum half to even.
//
// Layout: a sample is `rows` image rows of `row_len` elements (NCHW: C planes of H rows of W;
// channels_last: H rows of W * C), and row R is image row h = R mod H. A thread owns one vector of V
// elements (16 bytes where rows allow) at a fixed place in the row, works out which of its lanes lie in
// the box's columns once per sample, then walks a few rows down: the per-vector path is one or two
// vector loads, a select or a blend, and a store, with pointer increments and no integer division.
//
// In place (mix_): partner is an involution; the thread of row b <= p = partner[b] mixes the pair (b,
// p) at its vector's place in both rows, both read before either is written, and touches only vectors
// that hold mixed pixels (a CutMix row's box, a MixUp row whole); row b > p exits (its pair's thread
// does it). A partner outside range(B) is clamped to B - 1, so a bad partner never reads outside x (the
// public functions check the values first, on the device).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <cstring>
#include <type_traits>

#include "vector_access.cuh"

#ifdef FASTSD_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace fastsd {
namespace cuda_mix {

using namespace cuda_common;  // NOLINT: the shared helpers of vector_access.cuh

struct Params {
  const void* x;            // forward: the input; in place: the batch mixed in place; backward: the output gradient
  void* out;                // not in place
  const int64_t* partner;   // [B]; backward: its inverse
  const int64_t* boxes;     // [B, 4]: y0, y1, x0, x1 (half-open, in pixels)
  const void* lam;          // [B] float32 or float64
  const bool* use_box;      // [B]
  int64_t sample;           // elements per sample
  uint32_t B, H, pix;       // pix: elements per pixel along a row, 1 (NCHW) or C (channels_last)
  uint32_t rows;            // image rows per sample: planes * H
  uint32_t row_len, row_vecs;  // elements and V-element vectors per row
  uint32_t rows_per_thread;
  uint32_t items;           // threads per sample: row_vecs * ceil(rows / rows_per_thread)
  bool lam_double;
  bool packed;              // samples of fewer than kThreads items share blocks: thread -> (sample, item)
  FastDiv by_items;         // packed: thread -> sample
  FastDiv by_row_vecs;      // item -> (row group, vector in the row)
  FastDiv by_H;             // row -> image row
};

struct Plan {
  Params p;
  Dim3 grid, block;
  int vec;  // V: elements per vector (16 bytes' worth, or 1)
};

// What a launch needs; out is nullptr in place. Precondition (checked by the launcher): a sample has
// fewer than 2**31 elements. `target_threads` and `max_grid_y` are parameters for the tests.
inline Plan make_plan(const void* x, void* out, const int64_t* partner, const int64_t* boxes, const void* lam,
                      bool lam_double, const bool* use_box, int64_t B, int64_t C, int64_t H, int64_t W,
                      bool channels_last, int elem_size, int64_t target_threads = kTargetThreads,
                      int64_t max_grid_y = kMaxGridY) {
  Plan plan{};
  Params& p = plan.p;
  p.x = x, p.out = out, p.partner = partner, p.boxes = boxes, p.lam = lam, p.lam_double = lam_double;
  p.use_box = use_box;
  const bool aligned16 = reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  const int64_t pix = channels_last ? C : 1, rows = (channels_last ? 1 : C) * H, row_len = W * pix;
  const int64_t v = 16 / elem_size;
  plan.vec = (aligned16 && row_len % v == 0) ? int(v) : 1;  // 16-byte vectors when every row starts on 16 bytes
  p.sample = C * H * W;
  p.B = uint32_t(B), p.H = uint32_t(H), p.pix = uint32_t(pix), p.rows = uint32_t(rows);
  p.row_len = uint32_t(row_len), p.row_vecs = uint32_t(row_len / plan.vec);
  // Rows per thread: enough to amortise the prologue (the sample's box and weights) while the launch
  // still fills the GPU.
  const int64_t vectors = B * rows * int64_t(p.row_vecs);
  const int64_t rpt = std::min(rows, std::min(kMaxVectorsPerThread, std::max<int64_t>(1, vectors / target_threads)));
  p.rows_per_thread = uint32_t(rpt);
  const int64_t items = int64_t(p.row_vecs) * ((rows + rpt - 1) / rpt);
  p.items = uint32_t(items);
  p.by_items = FastDiv::make(p.items);
  p.by_row_vecs = FastDiv::make(p.row_vecs);
  p.by_H = FastDiv::make(uint32_t(H));
  plan.block = Dim3{kThreads, 1, 1};
  // A block row per sample leaves most of a block idle when a sample has few items (8 x 8 images):
  // then blocks take consecutive (sample, item) pairs instead, while B * items fits 32 bits.
  p.packed = items < kThreads && B * items <= int64_t(std::numeric_limits<uint32_t>::max()) - kThreads;
  if (p.packed) {
    plan.grid = Dim3{uint32_t((B * items + kThreads - 1) / kThreads), 1, 1};
  } else {
    plan.grid = Dim3{uint32_t((items + kThreads - 1) / kThreads), uint32_t(std::min<int64_t>(B, max_grid_y)), 1};
  }
  return plan;
}

// IEEE operations rounded to nearest even that the compiler never fuses into an FMA (PyTorch's eager
// `x * w1 + y * w2` rounds the products before the sum). The host build is compiled with
// -ffp-contract=off for the same reason.
FASTSD_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FASTSD_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
FASTSD_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
FASTSD_HD double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// uint8 lanes to and from float32 with full-rate float adds instead of conversions (I2F / F2I issue at a
// quarter of the FP32 rate on sm_80 / sm_90, and a uint8 MixUp vector has 48 of them): 2**23 + u has
// u in its low mantissa bits, and 1.5 * 2**23 + v (rounded to nearest even, as every add here is)
// holds round-half-even(v) in its low byte, for 0 <= v < 256 (v is at most 255 * (w1 + w2), and
// w1 + w2 <= 1 + 2**-23).
FASTSD_HD float bits_to_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}
FASTSD_HD uint32_t float_to_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}
constexpr uint32_t kU8Exponent = 0x4B000000u;  // the bits of 2**23: OR'ed with u, the float 2**23 + u
constexpr float kU8Bias = 8388608.0f;          // 2**23
constexpr float kRoundBias = 12582912.0f;      // 1.5 * 2**23
FASTSD_HD float u8_to_float(uint8_t u) {
  return add_rn(bits_to_float(kU8Exponent | u), -kU8Bias);
}
FASTSD_HD uint8_t round_to_u8(float v) {
  return uint8_t(float_to_bits(add_rn(v, kRoundBias)));
}

// The compute type of the MixUp weights: float64 for float64 x, else float32.
template <typename T>
using Weight = std::conditional_t<std::is_same<T, double>::value, double, float>;

// (w1, w2) = (lam[b], 1 - lam[b]): the difference in lam's dtype, then each cast to W (a float64 lam
// with float32 x rounds both to nearest, as `.to(torch.float32)` does).
template <typename W>
FASTSD_HD void weights(const Params& p, uint32_t b, W& w1, W& w2) {
  if (p.lam_double) {
    const double l = static_cast<const double*>(p.lam)[b];
    w1 = W(l), w2 = W(add_rn(1.0, -l));
  } else {
    const float l = static_cast<const float*>(p.lam)[b];
    w1 = W(l), w2 = W(add_rn(1.0f, -l));
  }
}

// One MixUp element, s from the row itself, t from its partner.
template <typename T, typename W>
FASTSD_HD T blend_lane(T s, T t, W w1, W w2) {
  if constexpr (std::is_same<T, float>::value || std::is_same<T, double>::value) {
    return add_rn(mul_rn(s, w1), mul_rn(t, w2));
  } else if constexpr (std::is_same<T, uint8_t>::value) {
    return round_to_u8(add_rn(mul_rn(u8_to_float(s), w1), mul_rn(u8_to_float(t), w2)));
  } else {  // float16 / bfloat16: each eager op computes in float32 and rounds its result to T
    const T a = T(mul_rn(float(s), w1)), c = T(mul_rn(float(t), w2));
    return T(add_rn(float(a), float(c)));
  }
}

// __byte_perm (PRMT, default mode): byte n of the result is byte (selector >> 4n) & 7 of the pair (x:
// bytes 0-3, y: bytes 4-7), or, where bit 3 of that nibble is set, that byte's sign bit copied to all
// eight bits. The host's copy is what the tests run; on the GPU it is the instruction.
FASTSD_HD uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t selector) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(x, y, selector);
#else
  uint32_t r = 0;
  for (int n = 0; n < 4; ++n) {
    const uint32_t nibble = (selector >> (4 * n)) & 0xFu, k = nibble & 7u;
    uint32_t byte = (k < 4 ? x >> (8 * k) : y >> (8 * (k - 4))) & 0xFFu;
    if (nibble & 8u) byte = (byte & 0x80u) ? 0xFFu : 0u;
    r |= byte << (8 * n);
  }
  return r;
#endif
}

// uint8 vectors word by word: lane l as float32 (its byte put under 2**23 by one byte permute, then
// an exact add), and four rounded float32 lanes (1.5 * 2**23 + v: the value in the low byte) packed
// back into a word by three byte permutes.
FASTSD_HD float u8_lane(const Words& v, int l) {
  return add_rn(bits_to_float(byte_perm(v.w[l >> 2], kU8Exponent, 0x7440u | uint32_t(l & 3))), -kU8Bias);
}

FASTSD_HD uint32_t pack_rounded(const float (&v)[4]) {
  uint32_t b[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) b[k] = float_to_bits(add_rn(v[k], kRoundBias));
  return byte_perm(byte_perm(b[0], b[1], 0x0040u), byte_perm(b[2], b[3], 0x0040u), 0x5410u);
}

// Both rows of a pair blended from one conversion of each uint8 lane: self = s * w1 + t * w2 and
// other = t * v1 + s * v2.
FASTSD_HD void blend_u8_pair(const Words& s, const Words& t, float w1, float w2, float v1, float v2, Words& self,
                             Words& other) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float a[4], c[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float fs = u8_lane(s, 4 * i + k), ft = u8_lane(t, 4 * i + k);
      a[k] = add_rn(mul_rn(fs, w1), mul_rn(ft, w2));
      c[k] = add_rn(mul_rn(ft, v1), mul_rn(fs, v2));
    }
    self.w[i] = pack_rounded(a);
    other.w[i] = pack_rounded(c);
  }
}

// Lane by lane: f(s[l], t[l]) for each of the V lanes of two vectors (the element itself at V == 1).
template <typename T, int V, typename F>
FASTSD_HD Raw<T, V> lanes(const Raw<T, V>& s, const Raw<T, V>& t, F f) {
  if constexpr (V == 1) {
    return f(s, t);
  } else {
    T a[V], c[V];
    memcpy(a, &s, sizeof(Words));
    memcpy(c, &t, sizeof(Words));
#pragma unroll
    for (int l = 0; l < V; ++l) a[l] = f(a[l], c[l]);
    Words r;
    memcpy(&r, a, sizeof(Words));
    return r;
  }
}

template <typename T, int V>
FASTSD_HD Raw<T, V> blend(const Raw<T, V>& s, const Raw<T, V>& t, Weight<T> w1, Weight<T> w2) {
  if constexpr (std::is_same<T, uint8_t>::value && V > 1) {
    Words r;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float a[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) a[k] = add_rn(mul_rn(u8_lane(s, 4 * i + k), w1), mul_rn(u8_lane(t, 4 * i + k), w2));
      r.w[i] = pack_rounded(a);
    }
    return r;
  } else {
    return lanes<T, V>(s, t, [=](T a, T c) { return blend_lane<T>(a, c, w1, w2); });
  }
}

// A pair of MixUp rows: self = s * w1 + t * w2, other = t * v1 + s * v2 (uint8: each lane converted
// once for both).
template <typename T, int V>
FASTSD_HD void blend_pair(const Raw<T, V>& s, const Raw<T, V>& t, Weight<T> w1, Weight<T> w2, Weight<T> v1,
                          Weight<T> v2, Raw<T, V>& self, Raw<T, V>& other) {
  if constexpr (std::is_same<T, uint8_t>::value && V > 1) {
    blend_u8_pair(s, t, w1, w2, v1, v2, self, other);
  } else {
    self = blend<T, V>(s, t, w1, w2);
    other = blend<T, V>(t, s, v1, v2);
  }
}

// The backward's products and sums, as PyTorch's eager ops compute them in g's dtype T: g * w with w
// cast to T (a 16-bit g: both in float32, the product rounded to T), and a + c rounded to T.
template <typename T>
FASTSD_HD T scale_lane(T g, Weight<T> w) {
  if constexpr (std::is_same<T, float>::value || std::is_same<T, double>::value) {
    return mul_rn(g, w);
  } else {
    return T(mul_rn(float(g), float(T(w))));
  }
}

template <typename T>
FASTSD_HD T add_lane(T a, T c) {
  if constexpr (std::is_same<T, float>::value || std::is_same<T, double>::value) {
    return add_rn(a, c);
  } else {
    return T(add_rn(float(a), float(c)));
  }
}

template <typename T, int V>
FASTSD_HD Raw<T, V> scale(const Raw<T, V>& g, Weight<T> w) {
  return lanes<T, V>(g, g, [=](T a, T) { return scale_lane<T>(a, w); });
}

template <typename T, int V>
FASTSD_HD Raw<T, V> add(const Raw<T, V>& s, const Raw<T, V>& t) {
  return lanes<T, V>(s, t, [](T a, T c) { return add_lane<T>(a, c); });
}

// Lanes of `take` from t, the others from s (bit patterns: NaN payloads and -0.0 as they are).
template <typename T, int V>
FASTSD_HD Raw<T, V> select(const Raw<T, V>& s, const Raw<T, V>& t, const Words& take) {
  if constexpr (V == 1) {
    return take.w[0] ? t : s;
  } else {
    Words r;
#pragma unroll
    for (int i = 0; i < 4; ++i) r.w[i] = (s.w[i] & ~take.w[i]) | (t.w[i] & take.w[i]);
    return r;
  }
}

// A row's partner, clamped into range(B) (as unsigned: a negative one becomes B - 1).
FASTSD_HD uint32_t partner_of(const Params& p, uint32_t b) {
  const uint64_t s = uint64_t(p.partner[b]);
  return s < p.B ? uint32_t(s) : p.B - 1;
}

// A row's box as this thread's vector sees it: the image rows [y0, y1), and the bits of the vector's
// lanes (elements j .. j + V - 1 of an image row) inside the box's columns; none for a MixUp row (its
// box is not read: it may hold anything).
struct Box {
  int64_t y0, y1;
  uint32_t lanes;
  FASTSD_HD bool covers(uint32_t h) const { return lanes != 0 && y0 <= int64_t(h) && int64_t(h) < y1; }
};

template <int V>
FASTSD_HD Box box_of(const Params& p, uint32_t b, uint32_t j) {
  if (!p.use_box[b]) return Box{0, 0, 0u};
  const int64_t* box = p.boxes + 4 * int64_t(b);
  const int64_t c0 = box[2] * int64_t(p.pix) - int64_t(j), c1 = box[3] * int64_t(p.pix) - int64_t(j);
  const int64_t lo = c0 < 0 ? 0 : (c0 > V ? V : c0), hi = c1 < 0 ? 0 : (c1 > V ? V : c1);
  const uint32_t below_hi = (1u << uint32_t(hi)) - 1u, below_lo = (1u << uint32_t(lo)) - 1u;
  return Box{box[0], box[1], hi > lo ? below_hi & ~below_lo : 0u};
}

// The lane bits of a whole vector (V <= 16).
template <int V>
struct AllLanes {
  static constexpr uint32_t value = (1u << V) - 1u;
};

// Where this thread works: the samples b0, b0 + step, ... below b_end, and in each its vector's first
// element j in the row, `rows` rows of the sample from r0, and h0 = r0 mod H.
struct Place {
  uint32_t j, r0, rows, h0;  // rows: how many, from r0
  int64_t first;             // r0 * row_len + j: the vector's offset in a sample
  uint32_t b0, step, b_end;
};

template <int V>
FASTSD_HD bool place_of(const Params& p, Dim3 bid, Dim3 tid, Dim3 gdim, Place& at) {
  uint32_t t = bid.x * kThreads + tid.x;
  if (p.packed) {  // one sample a thread
    if (t >= p.B * p.items) return false;
    const uint32_t b = p.by_items.div(t);
    t -= b * p.items;
    at.b0 = b, at.step = 1, at.b_end = b + 1;
  } else {  // a sample a block row, looping over samples when B is over the grid's height
    if (t >= p.items) return false;
    at.b0 = bid.y, at.step = gdim.y, at.b_end = p.B;
  }
  const uint32_t group = p.by_row_vecs.div(t);
  at.j = (t - group * p.row_vecs) * V;
  at.r0 = group * p.rows_per_thread;
  at.rows = (at.r0 + p.rows_per_thread < p.rows) ? p.rows_per_thread : p.rows - at.r0;
  at.h0 = at.r0 - p.by_H.div(at.r0) * p.H;
  at.first = int64_t(at.r0) * p.row_len + at.j;
  return true;
}

// One thread of the out-of-place launch (block `bid`, thread `tid` of a grid `gdim`).
template <typename T, int V>
FASTSD_HD void mix_thread(const Params& p, Dim3 bid, Dim3 tid, Dim3 gdim) {
  Place at;
  if (!place_of<V>(p, bid, tid, gdim, at)) return;
  const uint32_t n = at.rows;
#pragma unroll 1
  for (uint32_t b = at.b0; b < at.b_end; b += at.step) {
    const T* own = static_cast<const T*>(p.x) + int64_t(b) * p.sample + at.first;
    const T* other = static_cast<const T*>(p.x) + int64_t(partner_of(p, b)) * p.sample + at.first;
    T* out = static_cast<T*>(p.out) + int64_t(b) * p.sample + at.first;
    if (!p.use_box[b]) {
      Weight<T> w1, w2;
      weights(p, b, w1, w2);
#pragma unroll 1
      for (uint32_t r = 0; r < n; ++r, own += p.row_len, other += p.row_len, out += p.row_len) {
        store<T, V>(out, blend<T, V>(load<T, V>(own), load<T, V>(other), w1, w2));
      }
      continue;
    }
    const Box box = box_of<V>(p, b, at.j);
    const Words take = lane_mask<T>(box.lanes);
    uint32_t h = at.h0;
#pragma unroll 1
    for (uint32_t r = 0; r < n; ++r, own += p.row_len, other += p.row_len, out += p.row_len) {
      Raw<T, V> v;
      if (!box.covers(h)) {
        v = load<T, V>(own);
      } else if (box.lanes == AllLanes<V>::value) {
        v = load<T, V>(other);
      } else {  // the box's left or right edge inside the vector
        v = select<T, V>(load<T, V>(own), load<T, V>(other), take);
      }
      store<T, V>(out, v);
      if (++h == p.H) h = 0;
    }
  }
}

// One thread of the in-place launch: the pair (b, partner[b]) for b <= partner[b].
template <typename T, int V>
FASTSD_HD void mix_inplace_thread(const Params& p, Dim3 bid, Dim3 tid, Dim3 gdim) {
  Place at;
  if (!place_of<V>(p, bid, tid, gdim, at)) return;
  const uint32_t n = at.rows;
#pragma unroll 1
  for (uint32_t i = at.b0; i < at.b_end; i += at.step) {
    const uint32_t k = partner_of(p, i);
    if (k < i) continue;  // the pair's thread of row k mixes it
    T* xi = static_cast<T*>(const_cast<void*>(p.x)) + int64_t(i) * p.sample + at.first;
    T* xk = static_cast<T*>(const_cast<void*>(p.x)) + int64_t(k) * p.sample + at.first;
    const bool cut_i = p.use_box[i], cut_k = p.use_box[k];
    Weight<T> wi1{}, wi2{}, wk1{}, wk2{};
    if (!cut_i) weights(p, i, wi1, wi2);
    if (k == i) {  // its own partner: a CutMix row keeps its pixels, a MixUp row blends with itself
      if (cut_i) continue;
#pragma unroll 1
      for (uint32_t r = 0; r < n; ++r, xi += p.row_len) {
        const Raw<T, V> a = load<T, V>(xi);
        store<T, V>(xi, blend<T, V>(a, a, wi1, wi2));
      }
      continue;
    }
    if (!cut_k) weights(p, k, wk1, wk2);
    if (!cut_i && !cut_k) {  // two MixUp rows: every vector of both changes
#pragma unroll 1
      for (uint32_t r = 0; r < n; ++r, xi += p.row_len, xk += p.row_len) {
        const Raw<T, V> a = load<T, V>(xi), c = load<T, V>(xk);
        Raw<T, V> ni, nk;
        blend_pair<T, V>(a, c, wi1, wi2, wk1, wk2, ni, nk);
        store<T, V>(xi, ni);
        store<T, V>(xk, nk);
      }
      continue;
    }
    const Box bi = box_of<V>(p, i, at.j), bk = box_of<V>(p, k, at.j);
    const Words take_i = lane_mask<T>(bi.lanes), take_k = lane_mask<T>(bk.lanes);
    uint32_t h = at.h0;
#pragma unroll 1
    for (uint32_t r = 0; r < n; ++r, xi += p.row_len, xk += p.row_len) {
      const bool in_i = bi.covers(h), in_k = bk.covers(h);
      if (++h == p.H) h = 0;
      const bool mix_i = !cut_i || in_i, mix_k = !cut_k || in_k;  // the vector of row i / k changes
      if (!mix_i && !mix_k) continue;
      const bool whole_i = in_i && bi.lanes == AllLanes<V>::value, whole_k = in_k && bk.lanes == AllLanes<V>::value;
      // row i's old vector is read unless only row i changes and takes all of it from row k
      const Raw<T, V> a = (mix_k || !whole_i) ? load<T, V>(xi) : Raw<T, V>{};
      const Raw<T, V> c = (mix_i || !whole_k) ? load<T, V>(xk) : Raw<T, V>{};
      if (mix_i) {
        store<T, V>(xi, !cut_i ? blend<T, V>(a, c, wi1, wi2) : whole_i ? c : select<T, V>(a, c, take_i));
      }
      if (mix_k) {
        store<T, V>(xk, !cut_k ? blend<T, V>(c, a, wk1, wk2) : whole_k ? a : select<T, V>(c, a, take_k));
      }
    }
  }
}

// One thread of the backward launch (floating x only): with q = p.partner (the launcher passes the
// inverse of partner), grad_x[b] = kept(g)[b] + sent(g)[q], where a CutMix row keeps g outside its
// box and sends g inside it, a MixUp row keeps g * w1 and sends g * w2 (fastsd.reference.mix_backward).
// Each side is read only where it is nonzero somewhere in the vector; the sum is taken everywhere, as
// the reference takes it (-0.0 + +0.0 is +0.0). Bit for bit with finite gradients: a NaN comes out as
// a NaN, its payload the conversion's (as the forward's MixUp rows).
template <typename T, int V>
FASTSD_HD void mix_backward_thread(const Params& p, Dim3 bid, Dim3 tid, Dim3 gdim) {
  Place at;
  if (!place_of<V>(p, bid, tid, gdim, at)) return;
  const uint32_t n = at.rows;
  const Raw<T, V> zero{};  // all-zero bits: +0.0
#pragma unroll 1
  for (uint32_t b = at.b0; b < at.b_end; b += at.step) {
    const uint32_t q = partner_of(p, b);
    const T* own = static_cast<const T*>(p.x) + int64_t(b) * p.sample + at.first;
    const T* from = static_cast<const T*>(p.x) + int64_t(q) * p.sample + at.first;
    T* out = static_cast<T*>(p.out) + int64_t(b) * p.sample + at.first;
    const bool cut_b = p.use_box[b], cut_q = p.use_box[q];
    Weight<T> w1{}, w2{}, unused{};
    if (!cut_b) weights(p, b, w1, unused);
    if (!cut_q) weights(p, q, unused, w2);
    const Box bb = box_of<V>(p, b, at.j), bq = box_of<V>(p, q, at.j);
    const Words in_b = lane_mask<T>(bb.lanes), in_q = lane_mask<T>(bq.lanes);
    uint32_t h = at.h0;
#pragma unroll 1
    for (uint32_t r = 0; r < n; ++r, own += p.row_len, from += p.row_len, out += p.row_len) {
      const bool box_b = bb.covers(h), box_q = bq.covers(h);
      if (++h == p.H) h = 0;
      Raw<T, V> kept = zero, sent = zero;
      if (!cut_b) {
        kept = scale<T, V>(load<T, V>(own), w1);
      } else if (!box_b) {
        kept = load<T, V>(own);
      } else if (bb.lanes != AllLanes<V>::value) {
        kept = select<T, V>(load<T, V>(own), zero, in_b);
      }
      if (!cut_q) {
        sent = scale<T, V>(load<T, V>(from), w2);
      } else if (box_q) {
        sent = bq.lanes == AllLanes<V>::value ? load<T, V>(from) : select<T, V>(zero, load<T, V>(from), in_q);
      }
      store<T, V>(out, add<T, V>(kept, sent));
    }
  }
}

// The value checks of the public functions (mix_check_kernel), one batch row a thread, before the mix
// kernel on the same stream: partner a permutation (`sorted`, partner sorted, is range(B)) or, in place,
// an involution (partner[partner[r]] == r); the boxes inside the image; lam in [0, 1] (not NaN). The
// messages are those of the Triton check kernel (kernels/mix.py).
struct CheckParams {
  const int64_t* partner;  // [B]
  const int64_t* sorted;   // [B], partner sorted (not read for an involution)
  const int64_t* boxes;    // [B, 4]
  const void* lam;         // [B] float32 or float64
  bool lam_double, involution;
  int64_t B, H, W;
};

FASTSD_HD void mix_check_thread(const CheckParams& c, Dim3 bid, Dim3 tid) {
  const int64_t r = int64_t(bid.x) * kThreads + tid.x;
  if (r >= c.B) return;
  const int64_t p = c.partner[r];
  FASTSD_DEVICE_ASSERT(p >= 0 && p < c.B, "fastsd.mix: partner must be a permutation of range(B)");
  if (c.involution) {
    const int64_t back = c.partner[p < 0 ? 0 : (p >= c.B ? c.B - 1 : p)];
    FASTSD_DEVICE_ASSERT(back == r,
                         "fastsd.mix_: partner must be an involution (partner[partner[i]] == i) to mix in place");
  } else {
    FASTSD_DEVICE_ASSERT(c.sorted[r] == r, "fastsd.mix: partner must be a permutation of range(B)");
  }
  const int64_t* box = c.boxes + 4 * r;
  FASTSD_DEVICE_ASSERT(0 <= box[0] && box[0] <= box[1] && box[1] <= c.H && 0 <= box[2] && box[2] <= box[3] &&
                           box[3] <= c.W,
                       "fastsd.mix: boxes must satisfy 0 <= y0 <= y1 <= H and 0 <= x0 <= x1 <= W");
  const double lam = c.lam_double ? static_cast<const double*>(c.lam)[r] : static_cast<const float*>(c.lam)[r];
  FASTSD_DEVICE_ASSERT(lam >= 0 && lam <= 1, "fastsd.mix: lam must be in [0, 1]");
}

enum class Direction { kForward, kInPlace, kBackward };

#ifdef FASTSD_WITH_CUDA
// mix.cu: launch the kernel of `dtype` and direction on `stream` (the caller sets the device). The
// backward takes floating dtypes only.
cudaError_t launch_mix(const Plan& plan, Dtype dtype, Direction direction, cudaStream_t stream);
// mix.cu: launch mix_check_kernel (ceil(B / kThreads) blocks) on `stream`.
cudaError_t launch_mix_check(const CheckParams& params, cudaStream_t stream);
#endif

}  // namespace cuda_mix
}  // namespace fastsd
