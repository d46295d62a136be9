// The CUDA patch swap kernel's per-thread body and launch plan, free of torch so that the same code
// compiles for the GPU (patch_swap.cu, which nvcc builds in seconds without torch's headers) and
// for the host (tests/test_cuda_emulation.py runs every thread of a launch on the CPU against the
// reference). patch_swap_ops.cpp is the torch op: checks, device guard, stream, the plan, the launch.
//
// Same formula as csrc/cpu/patch_swap.cpp (`cell_select`): for element (b, c, h, w) in cell (ch, cw)
//   out = (keep ? x[b] : 0) + (take ? x[src[b]] : 0),  keep = !mask[b, ch, cw],
//   take = mask[mask_row[b], ch, cw]
// forward: src = partner, mask_row = b (keep == !take: a copy); backward: src = mask_row = q, the
// inverse of partner. Each output element is written once, each selected input element read once.
//
// Layout: a sample is `planes` planes of H rows of `row_len` elements (NCHW: C planes, rows of W;
// channels_last: one plane, rows of W * C). Every plane of a sample shares the cells, and every row of
// one cell row (the same ch) has the same keep / take pattern along it. A thread owns one vector of V
// elements (16 bytes where rows allow) at a fixed place in the row, works out each lane's cell once,
// then walks a few rows down and a few planes through: the per-element path is two vector loads at
// most, a select and a vector store, with pointer increments and no integer division (the few
// quotients of the prologue are multiply-shift, with magic numbers computed by the host).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "vector_access.cuh"

#ifdef FASTSD_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace fastsd {
namespace cuda_patch_swap {

using namespace cuda_common;  // NOLINT: the shared helpers of vector_access.cuh

// Index of the lowest set bit of x != 0.
FASTSD_HD uint32_t lowest_bit(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return uint32_t(__ffs(int(x)) - 1);
#else
  return uint32_t(__builtin_ctz(x));
#endif
}

struct Params {
  const void* x;
  void* out;
  const int64_t* src;       // [B] sample each lane takes from
  const int64_t* mask_row;  // [B] mask row of the taken cells; nullptr: b's own (the forward)
  const uint8_t* mask;      // [B, gh, gw], nonzero = swapped
  int64_t sample;           // elements per sample
  int64_t plane;            // elements per plane: H * row_len
  uint32_t B, planes, H, W, gh, gw;
  uint32_t row_len, row_vecs;  // elements and V-element vectors per row
  uint32_t rows_per_thread, planes_per_thread, plane_splits;
  uint32_t items;           // threads per (sample, plane split): row_vecs * ceil(H / rows_per_thread)
  FastDiv by_pixel;         // elements per pixel along a row: 1 (NCHW) or C (channels_last)
  FastDiv by_W, by_H;       // cells: floor(w * gw / W), floor(h * gh / H)
  FastDiv by_gh;            // rows left in a cell row
  FastDiv by_row_vecs;      // thread -> (row group, vector in the row)
  FastDiv by_splits;        // grid.y -> (sample, plane split)
};

struct Plan {
  Params p;
  Dim3 grid, block;
  int vec;  // V: elements per vector (16 bytes' worth, or 1)
};

// What a launch needs. forward: src = partner; backward: src = q (the inverse of partner), which is
// also the mask row of the taken cells. Precondition (checked by the launcher): H * row_len, W * gw
// and H * gh are below 2**31. `target_threads` and `max_grid_y` are parameters for the tests.
inline Plan make_plan(const void* x, void* out, const int64_t* src, const uint8_t* mask, bool backward,
                      int64_t B, int64_t C, int64_t H, int64_t W, int64_t gh, int64_t gw, bool channels_last,
                      int elem_size, int64_t target_threads = kTargetThreads, int64_t max_grid_y = kMaxGridY) {
  Plan plan{};
  Params& p = plan.p;
  p.x = x, p.out = out, p.src = src, p.mask_row = backward ? src : nullptr, p.mask = mask;
  const bool aligned16 = reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  const int64_t pix = channels_last ? C : 1, planes = channels_last ? 1 : C, row_len = W * pix;
  const int64_t v = 16 / elem_size;
  // 16-byte vectors when every row starts on 16 bytes; else one element per thread
  plan.vec = (aligned16 && row_len % v == 0) ? int(v) : 1;
  p.sample = C * H * W, p.plane = H * row_len;
  p.B = uint32_t(B), p.planes = uint32_t(planes), p.H = uint32_t(H), p.W = uint32_t(W);
  p.gh = uint32_t(gh), p.gw = uint32_t(gw);
  p.row_len = uint32_t(row_len), p.row_vecs = uint32_t(row_len / plan.vec);
  // Work per thread: enough vectors to amortise the prologue (cells, mask bytes) while the launch
  // still fills the GPU; planes first (they share the lanes' flags), then rows.
  const int64_t vectors = B * planes * H * int64_t(p.row_vecs);
  const int64_t per_thread = std::min(kMaxVectorsPerThread, std::max<int64_t>(1, vectors / target_threads));
  int64_t ppt = std::min<int64_t>(planes, per_thread);
  const int64_t splits = (planes + ppt - 1) / ppt;
  ppt = (planes + splits - 1) / splits;  // balance the splits
  const int64_t rpt = std::min<int64_t>(H, std::max<int64_t>(1, per_thread / ppt));
  p.planes_per_thread = uint32_t(ppt), p.plane_splits = uint32_t(splits), p.rows_per_thread = uint32_t(rpt);
  const int64_t items = int64_t(p.row_vecs) * ((H + rpt - 1) / rpt);
  p.items = uint32_t(items);
  p.by_pixel = FastDiv::make(uint32_t(pix));
  p.by_W = FastDiv::make(uint32_t(W));
  p.by_H = FastDiv::make(uint32_t(H));
  p.by_gh = FastDiv::make(uint32_t(gh));
  p.by_row_vecs = FastDiv::make(p.row_vecs);
  p.by_splits = FastDiv::make(uint32_t(splits));
  plan.block = Dim3{kThreads, 1, 1};
  plan.grid = Dim3{uint32_t((items + kThreads - 1) / kThreads),
                   uint32_t(std::min<int64_t>(B * splits, max_grid_y)), 1};
  return plan;
}

FASTSD_HD bool swapped(const uint8_t* cell) {
  return FASTSD_CUDA_ACCESS(cell, 1, false) && *cell != 0;
}

// a + c lane by lane in T (uint8 wraps, as torch's; 16-bit floats round once from the fp32 sum, as
// torch's). uint8 vectors add four lanes per word (SWAR).
template <typename T>
FASTSD_HD T add_lanes(T a, T c) {
  return T(a + c);
}

template <typename T>
FASTSD_HD Words add_lanes(const Words& a, const Words& c) {
  Words r;
  if constexpr (sizeof(T) == 1) {
#pragma unroll
    for (int i = 0; i < 4; ++i) r.w[i] = ((a.w[i] & 0x7F7F7F7Fu) + (c.w[i] & 0x7F7F7F7Fu)) ^ ((a.w[i] ^ c.w[i]) & 0x80808080u);
  } else {
    constexpr int kLanes = sizeof(Words) / sizeof(T);
    T x[kLanes], y[kLanes];
    memcpy(x, &a, sizeof(Words));
    memcpy(y, &c, sizeof(Words));
#pragma unroll
    for (int l = 0; l < kLanes; ++l) x[l] = T(x[l] + y[l]);
    memcpy(&r, x, sizeof(Words));
  }
  return r;
}

// What one vector does, from its lanes' keep / take bits: copy one side (the forward's only cases
// when the vector lies in one cell), add both, write zeros, or (across a cell edge) select lanes.
enum class Kind { kOwn, kOther, kBoth, kZero, kMixed };

template <int V, bool kBackward>
FASTSD_HD Kind classify(uint32_t keep, uint32_t take) {
  constexpr uint32_t kAll = (V >= 32) ? ~0u : ((1u << V) - 1);
  if (take == 0 && keep == kAll) return Kind::kOwn;
  if (take == kAll && keep == 0) return Kind::kOther;
  if (kBackward && take == kAll && keep == kAll) return Kind::kBoth;
  if (kBackward && take == 0 && keep == 0) return Kind::kZero;
  return Kind::kMixed;  // lanes of two cells: V > 1 only
}

// The byte masks of a mixed vector's lanes.
struct Masks {
  Words keep_only, take_only, both;
};

template <typename T, int V, bool kBackward, Kind kKind>
struct Select {
  Masks m;                    // kMixed only
  bool load_own, load_other;  // kMixed only
  FASTSD_HD Raw<T, V> operator()(const T* own, const T* other) const {
    if (kKind == Kind::kOwn) return load<T, V>(own);
    if (kKind == Kind::kOther) return load<T, V>(other);
    if (kKind == Kind::kBoth) return add_lanes<T>(load<T, V>(own), load<T, V>(other));
    Raw<T, V> r{};  // zeros: all-zero bits are 0 in every supported dtype
    if constexpr (V > 1) {  // a single lane is never mixed
      if (kKind == Kind::kMixed) {
        const Words a = load_own ? load<T, V>(own) : r, c = load_other ? load<T, V>(other) : r;
#pragma unroll
        for (int i = 0; i < 4; ++i) r.w[i] = (a.w[i] & m.keep_only.w[i]) | (c.w[i] & m.take_only.w[i]);
        if (kBackward && (m.both.w[0] | m.both.w[1] | m.both.w[2] | m.both.w[3])) {
          const Words s = add_lanes<T>(a, c);
#pragma unroll
          for (int i = 0; i < 4; ++i) r.w[i] |= s.w[i] & m.both.w[i];
        }
      }
    }
    return r;
  }
};

// `n` vectors `stride` elements apart, kGroup at a time: a group's loads are issued before its
// stores, so a thread has 4 loads in flight when it copies (2 x 2 when it adds). Not unrolled
// further: out may alias x as far as the compiler knows, so more would only add registers.
template <typename T, int V, bool kBackward, Kind kKind>
FASTSD_HD void over_vectors(const Select<T, V, kBackward, kKind>& f, const T* own, const T* other, T* out, uint32_t n,
                            int64_t stride) {
  constexpr uint32_t kGroup = (kKind == Kind::kMixed) ? 1 : (kKind == Kind::kBoth) ? 2 : 4;
#pragma unroll 1
  for (uint32_t q = 0; q < n; q += kGroup) {
    Raw<T, V> r[kGroup];
#pragma unroll
    for (uint32_t k = 0; k < kGroup; ++k) {
      if (q + k < n) r[k] = f(own + k * stride, other + k * stride);
    }
#pragma unroll
    for (uint32_t k = 0; k < kGroup; ++k) {
      if (q + k < n) store<T, V>(out + k * stride, r[k]);
    }
    own += kGroup * stride, other += kGroup * stride, out += kGroup * stride;
  }
}

// `n` vectors `stride` elements apart (planes of a row, or rows of a cell row) with the same lanes'
// keep / take bits.
template <typename T, int V, bool kBackward>
FASTSD_HD void select_rows(uint32_t keep, uint32_t take, const T* own, const T* other, T* out, uint32_t n,
                           int64_t stride) {
  switch (classify<V, kBackward>(keep, take)) {
    case Kind::kOwn:
      return over_vectors(Select<T, V, kBackward, Kind::kOwn>{}, own, other, out, n, stride);
    case Kind::kOther:
      return over_vectors(Select<T, V, kBackward, Kind::kOther>{}, own, other, out, n, stride);
    case Kind::kBoth:
      if (kBackward) over_vectors(Select<T, V, kBackward, Kind::kBoth>{}, own, other, out, n, stride);
      return;
    case Kind::kZero:
      if (kBackward) over_vectors(Select<T, V, kBackward, Kind::kZero>{}, own, other, out, n, stride);
      return;
    default:
      if (V > 1) {
        const Masks m{lane_mask<T>(keep & ~take), lane_mask<T>(take & ~keep), lane_mask<T>(keep & take)};
        over_vectors(Select<T, V, kBackward, Kind::kMixed>{m, keep != 0, take != 0}, own, other, out, n, stride);
      }
  }
}

// One thread of the launch (block `bid`, thread `tid` of a grid `gdim`).
template <typename T, int V, bool kBackward>
FASTSD_HD void cell_select_thread(const Params& p, Dim3 bid, Dim3 tid, Dim3 gdim) {
  constexpr uint32_t kAll = (V >= 32) ? ~0u : ((1u << V) - 1);
  const uint32_t t = bid.x * kThreads + tid.x;
  if (t >= p.items) return;
  const uint32_t group = p.by_row_vecs.div(t);
  const uint32_t j = (t - group * p.row_vecs) * V;  // first element of the vector in its row
  const uint32_t r0 = group * p.rows_per_thread;
  const uint32_t r1 = (r0 + p.rows_per_thread < p.H) ? r0 + p.rows_per_thread : p.H;

  // The lanes' cells along the row: cw0 for lane 0, bit l of `steps` when lane l starts the next cell
  // (cw is monotone in j and moves by at most one per pixel, as gw <= W).
  uint32_t w = p.by_pixel.div(j);
  uint32_t c = j - w * p.by_pixel.d;
  const uint32_t cw0 = p.by_W.div(w * p.gw);
  uint32_t crem = w * p.gw - cw0 * p.W;
  uint32_t steps = 0;
#pragma unroll
  for (int l = 1; l < V; ++l) {
    if (++c == p.by_pixel.d) {
      c = 0;
      crem += p.gw;
      if (crem >= p.W) {
        crem -= p.W;
        steps |= 1u << l;
      }
    }
  }
  const uint32_t ch0 = p.by_H.div(r0 * p.gh);
  const uint32_t hrem0 = r0 * p.gh - ch0 * p.H;
  const uint32_t cells = p.gh * p.gw;

#pragma unroll 1
  for (uint32_t z = bid.y; z < p.B * p.plane_splits; z += gdim.y) {
    const uint32_t b = p.by_splits.div(z);
    const uint32_t o0 = (z - b * p.plane_splits) * p.planes_per_thread;
    if (o0 >= p.planes) continue;
    const uint32_t n = (o0 + p.planes_per_thread < p.planes) ? p.planes_per_thread : p.planes - o0;
    const int64_t s = p.src[b];
    const uint8_t* own_cells = p.mask + int64_t(b) * cells;
    const uint8_t* other_cells = kBackward ? p.mask + p.mask_row[b] * cells : own_cells;
    // 64-bit only here: the sample bases; below, pointers move by increments
    const int64_t first = int64_t(o0) * p.plane + int64_t(r0) * p.row_len + j;
    const T* own = static_cast<const T*>(p.x) + int64_t(b) * p.sample + first;
    const T* other = static_cast<const T*>(p.x) + s * p.sample + first;
    T* out = static_cast<T*>(p.out) + int64_t(b) * p.sample + first;

    uint32_t ch = ch0, hrem = hrem0;  // h * gh == ch * H + hrem
#pragma unroll 1
    for (uint32_t h = r0; h < r1;) {
      // The rows up to the next cell row share the lanes' keep / take bits: one pass per distinct
      // cell under the vector (usually one or two), whose lanes run up to the next cell's first lane.
      const uint32_t left = p.by_gh.div(p.H - hrem + p.gh - 1);  // ceil((H - hrem) / gh)
      const uint32_t rows = left < r1 - h ? left : r1 - h;
      uint32_t keep = 0, take = 0, cell = ch * p.gw + cw0, lane = 0, rest = steps;
#pragma unroll 1
      while (lane < uint32_t(V)) {
        const uint32_t next = rest ? lowest_bit(rest) : uint32_t(V);
        const uint32_t lanes = ((next >= 32 ? 0u : (1u << next)) - 1u) & ~((1u << lane) - 1u);
        if (swapped(other_cells + cell)) take |= lanes;
        if (kBackward && !swapped(own_cells + cell)) keep |= lanes;
        lane = next, rest &= rest - 1, ++cell;
      }
      if (!kBackward) keep = ~take & kAll;  // the forward copies one side
      if (n == 1) {  // one plane (channels_last): the rows are the group dimension
        select_rows<T, V, kBackward>(keep, take, own, other, out, rows, p.row_len);
      } else {
#pragma unroll 1
        for (uint32_t r = 0; r < rows; ++r) {
          select_rows<T, V, kBackward>(keep, take, own + r * p.row_len, other + r * p.row_len, out + r * p.row_len,
                                       n, p.plane);
        }
      }
      own += rows * p.row_len, other += rows * p.row_len, out += rows * p.row_len;
      h += rows;
      hrem += rows * p.gh;
      if (hrem >= p.H) hrem -= p.H, ++ch;
    }
  }
}

// The public function's value check on the cuda backend (permutation_check_kernel), one batch row a
// thread, before the patch swap kernel on the same stream: `sorted` (partner sorted) is range(B), so
// partner is a permutation, as the Triton kernel asserts it (kernels/patch_swap.py, same message).
// Three launches a checked call (the sort, this, the kernel) where the ATen check took four more.
struct PermutationCheck {
  const int64_t* sorted;  // [B]
  int64_t B;
};

FASTSD_HD void permutation_check_thread(const PermutationCheck& c, Dim3 bid, Dim3 tid) {
  const int64_t r = int64_t(bid.x) * kThreads + tid.x;
  if (r >= c.B) return;
  FASTSD_DEVICE_ASSERT(c.sorted[r] == r, "fastsd.patch_swap: partner must be a permutation of range(B)");
}

#ifdef FASTSD_WITH_CUDA
// patch_swap.cu: launch the kernel of `dtype` and direction on `stream` (the caller sets the device).
cudaError_t launch_cell_select(const Plan& plan, Dtype dtype, bool backward, cudaStream_t stream);
// patch_swap.cu: launch permutation_check_kernel (ceil(B / kThreads) blocks) on `stream`.
cudaError_t launch_permutation_check(const PermutationCheck& check, cudaStream_t stream);
#endif

}  // namespace cuda_patch_swap
}  // namespace fastsd
