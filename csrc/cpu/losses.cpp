// CPU kernels of the fused distillation losses (schemas and formulas: csrc/losses.cpp).
//
// Each kernel reads its inputs once per pass (a row of logits stays in cache between the passes
// over it), computes the loss and, when asked, the gradient in the same sweep. Arithmetic is in
// at::opmath_type (float for half/bfloat16/float, double for double); sums across elements are
// accumulated per task in double and the per-task partials are added in a fixed order, so results
// do not depend on the number of threads.
//
// Two implementations of each kernel:
// * generic templates (first below), used for float64 and where the compiler has no GCC vector
//   extensions;
// * vectorised float/half/bfloat16 kernels (the FASTSD_LOSSES_ISA_PASS part at the end of this
//   file), written with GCC vector extensions and compiled three times by including this file into
//   itself: for AVX-512 (16 lanes), AVX2 + FMA (8 lanes) and the build's baseline (4 lanes, what the
//   compiler makes of them). cpu::cpu_isa() (capability.h) picks one for the process: the widest
//   that the CPU, ATen's capability (ATEN_CPU_CAPABILITY) and FASTSD_CPU_CAPABILITY allow.
//   half/bfloat16 rows are converted to float vectors in registers (or into a small per-task
//   buffer for logits rows), so every loop runs on whole float vectors.
#ifndef FASTSD_LOSSES_ISA_PASS
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "alloc.h"
#include "capability.h"

#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"  // vector types in the signatures of inline helpers
#define FASTSD_VECTOR_KERNELS 1
#endif

namespace fastsd {
namespace {

// Sums of a loop are split over this many lanes so that the compiler can vectorise them.
constexpr int kLanes = 8;

// exp for the float paths: Cody-Waite range reduction and the Cephes expf polynomial (relative
// error ~1e-7, like libm's), written without branches or calls so that loops over it vectorise.
// Arguments here are <= 0 up to rounding (logits minus their max or log-sum-exp); below -87.3
// the result is 0, as exp(-inf) is.
inline float vexp(float x) {
  const float xc = std::min(std::max(x, -87.3f), 88.7f);
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.3f ? 0.0f : y * scale;
}
inline double vexp(double x) { return std::exp(x); }

// Statistics of one row of logits: m = max z, log_s1 = log sum exp(z - m),
// log_st = log sum exp((z - m) / T), zy = z[y] (0 when y is out of the row).
struct RowStats {
  double m = 0, log_s1 = 0, log_st = 0, zy = 0;
  double lse1() const { return m + log_s1; }
};

template <typename scalar_t>
RowStats row_stats(const scalar_t* z, int64_t K, double inv_t, int64_t y, bool with_t1) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  acc_t ml[kLanes];
  for (int l = 0; l < kLanes; ++l) ml[l] = -inf;
  const int64_t K8 = K - K % kLanes;
  for (int64_t k = 0; k < K8; k += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const acc_t v = static_cast<acc_t>(z[k + l]);
      ml[l] = v > ml[l] ? v : ml[l];
    }
  acc_t m = -inf;
  for (int l = 0; l < kLanes; ++l) m = std::max(m, ml[l]);
  for (int64_t k = K8; k < K; ++k) m = std::max(m, static_cast<acc_t>(z[k]));
  const acc_t it = static_cast<acc_t>(inv_t);
  double s1_total = 0, st_total = 0;
  // Blocks of kLanes lanes; each lane sums at most 512 terms in acc_t before they go to double.
  for (int64_t k0 = 0; k0 < K8; k0 += 512 * kLanes) {
    const int64_t k1 = std::min(K8, k0 + 512 * kLanes);
    acc_t s1[kLanes] = {}, st[kLanes] = {};
    if (with_t1) {
      for (int64_t k = k0; k < k1; k += kLanes)
        for (int l = 0; l < kLanes; ++l) {
          const acc_t d = static_cast<acc_t>(z[k + l]) - m;
          s1[l] += vexp(d);
          st[l] += vexp(d * it);
        }
    } else {
      for (int64_t k = k0; k < k1; k += kLanes)
        for (int l = 0; l < kLanes; ++l) st[l] += vexp((static_cast<acc_t>(z[k + l]) - m) * it);
    }
    for (int l = 0; l < kLanes; ++l) {
      s1_total += s1[l];
      st_total += st[l];
    }
  }
  for (int64_t k = K8; k < K; ++k) {
    const acc_t d = static_cast<acc_t>(z[k]) - m;
    if (with_t1) s1_total += vexp(d);
    st_total += vexp(d * it);
  }
  RowStats r;
  r.m = m;
  r.log_s1 = std::log(s1_total);
  r.log_st = std::log(st_total);
  r.zy = (y >= 0 && y < K) ? static_cast<double>(static_cast<acc_t>(z[y])) : 0.0;
  return r;
}

// ---------------------------------------------------------------------------------------------
// pair KD: one task per pair, led by its lower index; it reads both rows and writes both gradients.
//
// Masked terms are skipped (branches / selects), never multiplied by 0, so NaN / Inf reach only
// the terms that read them: a row with an ignored label is not read at all (its gradient is 0,
// and its partner is a singleton); a teacher row gets no KD gradient and its KL term is not added.
// In a pair (i < j) i teaches unless j is strictly more confident (a NaN confidence: a tie).

// A row that contributes nothing: gradient exactly 0.
template <typename T>
void zero_row(T* g, int64_t K) {
  std::memset(static_cast<void*>(g), 0, static_cast<size_t>(K) * sizeof(T));
}

template <typename scalar_t>
double pair_kd_pair(const scalar_t* logits, scalar_t* grad, const int64_t* labels, int64_t i, int64_t j,
                    int64_t K, double inv_t, int64_t ignore_index, bool symmetric, double ce_scale,
                    double kd_loss_scale, double kd_grad_scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool vi = labels[i] != ignore_index, vj = j != i && labels[j] != ignore_index;
  if (grad != nullptr && !vi) zero_row(grad + i * K, K);
  if (grad != nullptr && j != i && !vj) zero_row(grad + j * K, K);
  if (!vi && !vj) return 0.0;
  if (!vi || !vj) {  // a singleton (or a pair with an ignored row): the valid row's CE only
    const int64_t r = vi ? i : j, y = labels[r];
    const scalar_t* zr = logits + r * K;
    const RowStats sr = row_stats(zr, K, inv_t, y, true);
    if (grad != nullptr) {
      const acc_t lse1 = static_cast<acc_t>(sr.lse1()), ce = static_cast<acc_t>(ce_scale);
      scalar_t* gr = grad + r * K;
      for (int64_t k = 0; k < K; ++k)
        gr[k] = static_cast<scalar_t>(ce * (vexp(static_cast<acc_t>(zr[k]) - lse1) - acc_t(k == y)));
    }
    return ce_scale * (sr.lse1() - sr.zy);
  }
  // A pair, both labels valid.
  const scalar_t* zi = logits + i * K;
  const scalar_t* zj = logits + j * K;
  const int64_t yi = labels[i], yj = labels[j];
  const RowStats si = row_stats(zi, K, inv_t, yi, true);
  const RowStats sj = row_stats(zj, K, inv_t, yj, true);
  double loss = ce_scale * (si.lse1() - si.zy) + ce_scale * (sj.lse1() - sj.zy);
  const bool i_teaches = !(sj.zy - sj.lse1() > si.zy - si.lse1());
  const bool kd_i = symmetric || !i_teaches, kd_j = symmetric || i_teaches;  // row i (j) is a student
  const double w = symmetric ? 0.5 : 1.0;

  const acc_t it = static_cast<acc_t>(inv_t);
  const acc_t mi = static_cast<acc_t>(si.m), mj = static_cast<acc_t>(sj.m);
  const acc_t lsti = static_cast<acc_t>(si.log_st), lstj = static_cast<acc_t>(sj.log_st);
  const acc_t lse1i = static_cast<acc_t>(si.lse1()), lse1j = static_cast<acc_t>(sj.lse1());
  const acc_t ce = static_cast<acc_t>(ce_scale);
  const acc_t g_kd = static_cast<acc_t>(kd_grad_scale * w);
  double kl_i = 0, kl_j = 0;
  scalar_t* gi = grad ? grad + i * K : nullptr;
  scalar_t* gj = grad ? grad + j * K : nullptr;
  // One element: the two KL terms and, when asked, both gradient entries (the one-hot of the
  // label is subtracted after the loop, which keeps the loop free of integer compares).
  auto kd_grad = [&](bool on, acc_t p, acc_t q) { return on ? g_kd * (p - q) : acc_t(0); };
  auto element = [&](int64_t k, acc_t& a, acc_t& b, auto with_grad) {
    const acc_t xi = static_cast<acc_t>(zi[k]), xj = static_cast<acc_t>(zj[k]);
    const acc_t lpi = (xi - mi) * it - lsti, lpj = (xj - mj) * it - lstj;
    const acc_t pi = vexp(lpi), pj = vexp(lpj);
    a += pj * (lpj - lpi);  // KL(p_j || p_i): row i learns from j
    b += pi * (lpi - lpj);
    if constexpr (decltype(with_grad)::value) {
      gi[k] = static_cast<scalar_t>(ce * vexp(xi - lse1i) + kd_grad(kd_i, pi, pj));
      gj[k] = static_cast<scalar_t>(ce * vexp(xj - lse1j) + kd_grad(kd_j, pj, pi));
    }
  };
  auto sweep = [&](auto with_grad) {
    const int64_t K8 = K - K % kLanes;
    for (int64_t k0 = 0; k0 < K8; k0 += 512 * kLanes) {
      const int64_t k1 = std::min(K8, k0 + 512 * kLanes);
      acc_t a[kLanes] = {}, b[kLanes] = {};
      for (int64_t k = k0; k < k1; k += kLanes)
        for (int l = 0; l < kLanes; ++l) element(k + l, a[l], b[l], with_grad);
      for (int l = 0; l < kLanes; ++l) {
        kl_i += a[l];
        kl_j += b[l];
      }
    }
    acc_t a = 0, b = 0;
    for (int64_t k = K8; k < K; ++k) element(k, a, b, with_grad);
    kl_i += a;
    kl_j += b;
  };
  if (gi) {
    sweep(std::true_type{});
    // Rewrite the label entries with the one-hot term (from scratch: no second rounding).
    for (const int64_t k : {yi, yj}) {
      const acc_t xi = static_cast<acc_t>(zi[k]), xj = static_cast<acc_t>(zj[k]);
      const acc_t pi = vexp((xi - mi) * it - lsti), pj = vexp((xj - mj) * it - lstj);
      gi[k] = static_cast<scalar_t>(ce * (vexp(xi - lse1i) - acc_t(k == yi)) + kd_grad(kd_i, pi, pj));
      gj[k] = static_cast<scalar_t>(ce * (vexp(xj - lse1j) - acc_t(k == yj)) + kd_grad(kd_j, pj, pi));
    }
  } else {
    sweep(std::false_type{});
  }
  double kd = 0;
  if (kd_i) kd += w * kl_i;
  if (kd_j) kd += w * kl_j;
  return loss + kd_loss_scale * kd;
}

// ---------------------------------------------------------------------------------------------
// classic KD: one task per row.

template <typename scalar_t>
double kd_row(const scalar_t* zs, const scalar_t* zt, scalar_t* g, int64_t K, double inv_t, double grad_scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowStats ss = row_stats(zs, K, inv_t, -1, false);
  const RowStats st = row_stats(zt, K, inv_t, -1, false);
  const acc_t it = static_cast<acc_t>(inv_t);
  const acc_t ms = static_cast<acc_t>(ss.m), mt = static_cast<acc_t>(st.m);
  const acc_t ls = static_cast<acc_t>(ss.log_st), lt = static_cast<acc_t>(st.log_st);
  const acc_t gs = static_cast<acc_t>(grad_scale);
  auto element = [&](int64_t k, acc_t& a) {
    const acc_t lq = (static_cast<acc_t>(zs[k]) - ms) * it - ls;
    const acc_t lp = (static_cast<acc_t>(zt[k]) - mt) * it - lt;
    const acc_t q = vexp(lq), pt = vexp(lp);
    a += pt * (lp - lq);
    if (g) g[k] = static_cast<scalar_t>(gs * (q - pt));
  };
  double kl = 0;
  const int64_t K8 = K - K % kLanes;
  for (int64_t k0 = 0; k0 < K8; k0 += 512 * kLanes) {
    const int64_t k1 = std::min(K8, k0 + 512 * kLanes);
    acc_t a[kLanes] = {};
    for (int64_t k = k0; k < k1; k += kLanes)
      for (int l = 0; l < kLanes; ++l) element(k + l, a[l]);
    for (int l = 0; l < kLanes; ++l) kl += a[l];
  }
  acc_t a = 0;
  for (int64_t k = K8; k < K; ++k) element(k, a);
  kl += a;
  return kl;
}

// ---------------------------------------------------------------------------------------------
// feature alignment: all layers in one parallel loop over (layer, chunk) tasks.

enum Kind : int64_t { kMse = 0, kL1 = 1, kSmoothL1 = 2, kCosine = 3 };
constexpr double kCosineEps = 1e-8;
constexpr int64_t kChunk = 16384;  // elements (or positions x channels) per task
constexpr int64_t kMinRun = 256;   // positions per cosine task, at least (channels first)

struct Task {
  int64_t layer, begin, end;  // elements [begin, end) (elementwise kinds) or positions (cosine)
};

template <int64_t KIND, typename acc_t>
inline void elementwise(acc_t d, acc_t& e, acc_t& g) {
  const acc_t ad = std::abs(d);
  const acc_t sgn = acc_t((d > 0) - (d < 0));
  if (KIND == kMse) {
    e = d * d;
    g = acc_t(2) * d;
  } else if (KIND == kL1) {
    e = ad;
    g = sgn;
  } else {
    e = ad < acc_t(1) ? acc_t(0.5) * d * d : ad - acc_t(0.5);
    g = d > acc_t(1) ? acc_t(1) : (d < acc_t(-1) ? acc_t(-1) : d);  // clamp(d, -1, 1), keeps NaN as torch does
  }
}

template <int64_t KIND, typename scalar_t>
double elementwise_task(const scalar_t* s, const scalar_t* t, scalar_t* g, int64_t begin, int64_t end,
                        double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t sc = static_cast<acc_t>(scale);
  auto element = [&](int64_t k, acc_t& a) {
    acc_t e, gk;
    elementwise<KIND, acc_t>(static_cast<acc_t>(s[k]) - static_cast<acc_t>(t[k]), e, gk);
    a += e;
    if (g) g[k] = static_cast<scalar_t>(sc * gk);
  };
  double total = 0;
  const int64_t end8 = end - (end - begin) % kLanes;
  for (int64_t k0 = begin; k0 < end8; k0 += 256 * kLanes) {
    const int64_t k1 = std::min(end8, k0 + 256 * kLanes);
    acc_t a[kLanes] = {};
    if (g) {
      for (int64_t k = k0; k < k1; k += kLanes)
        for (int l = 0; l < kLanes; ++l) element(k + l, a[l]);
    } else {
      for (int64_t k = k0; k < k1; k += kLanes)
        for (int l = 0; l < kLanes; ++l) element(k + l, a[l]);
    }
    for (int l = 0; l < kLanes; ++l) total += a[l];
  }
  acc_t a = 0;
  for (int64_t k = end8; k < end; ++k) element(k, a);
  return scale * (total + a);
}

template <typename scalar_t>
double elementwise_task(const scalar_t* s, const scalar_t* t, scalar_t* g, int64_t begin, int64_t end,
                        int64_t kind, double scale) {
  switch (kind) {
    case kMse: return elementwise_task<kMse, scalar_t>(s, t, g, begin, end, scale);
    case kL1: return elementwise_task<kL1, scalar_t>(s, t, g, begin, end, scale);
    default: return elementwise_task<kSmoothL1, scalar_t>(s, t, g, begin, end, scale);
  }
}

// Cosine over positions [begin, end) of a layer [N, C, *spatial] with S spatial positions per sample.
// channels_last: element (n, c, s) at (n * S + s) * C + c; else at (n * C + c) * S + s.
template <typename scalar_t>
double cosine_task(const scalar_t* x, const scalar_t* y, scalar_t* g, int64_t begin, int64_t end, int64_t C,
                   int64_t S, bool channels_last, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  double total = 0;
  auto finish = [&](double dot, double xx, double yy, double& c, double& ax, double& ay, double& nx) {
    nx = std::sqrt(xx);
    ax = std::max(nx, kCosineEps);
    ay = std::max(std::sqrt(yy), kCosineEps);
    c = dot / (ax * ay);
    total += 1.0 - c;
  };
  if (channels_last) {
    for (int64_t q = begin; q < end; ++q) {
      const scalar_t* xq = x + q * C;
      const scalar_t* yq = y + q * C;
      acc_t dot = 0, xx = 0, yy = 0;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t a = static_cast<acc_t>(xq[c]), b = static_cast<acc_t>(yq[c]);
        dot += a * b;
        xx += a * a;
        yy += b * b;
      }
      double cs, ax, ay, nx;
      finish(dot, xx, yy, cs, ax, ay, nx);
      if (g) {
        const acc_t ky = static_cast<acc_t>(-scale / (ax * ay));
        const acc_t kx = nx > kCosineEps ? static_cast<acc_t>(scale * cs / (nx * nx)) : acc_t(0);
        for (int64_t c = 0; c < C; ++c)
          g[q * C + c] = static_cast<scalar_t>(ky * static_cast<acc_t>(yq[c]) + kx * static_cast<acc_t>(xq[c]));
      }
    }
    return scale * total;
  }
  // Channels first: positions of one sample are contiguous; process runs of them together.
  constexpr int64_t kRun = 256;
  acc_t dot[kRun], xx[kRun], yy[kRun], ky[kRun], kx[kRun];
  for (int64_t q0 = begin; q0 < end;) {
    const int64_t n = q0 / S, s0 = q0 % S;
    const int64_t len = std::min({kRun, S - s0, end - q0});
    const int64_t base = n * C * S + s0;
    std::fill(dot, dot + len, acc_t(0));
    std::fill(xx, xx + len, acc_t(0));
    std::fill(yy, yy + len, acc_t(0));
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* xc = x + base + c * S;
      const scalar_t* yc = y + base + c * S;
      for (int64_t r = 0; r < len; ++r) {
        const acc_t a = static_cast<acc_t>(xc[r]), b = static_cast<acc_t>(yc[r]);
        dot[r] += a * b;
        xx[r] += a * a;
        yy[r] += b * b;
      }
    }
    for (int64_t r = 0; r < len; ++r) {
      double cs, ax, ay, nx;
      finish(dot[r], xx[r], yy[r], cs, ax, ay, nx);
      ky[r] = static_cast<acc_t>(-scale / (ax * ay));
      kx[r] = nx > kCosineEps ? static_cast<acc_t>(scale * cs / (nx * nx)) : acc_t(0);
    }
    if (g) {
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* xc = x + base + c * S;
        const scalar_t* yc = y + base + c * S;
        scalar_t* gc = g + base + c * S;
        for (int64_t r = 0; r < len; ++r)
          gc[r] = static_cast<scalar_t>(ky[r] * static_cast<acc_t>(yc[r]) + kx[r] * static_cast<acc_t>(xc[r]));
      }
    }
    q0 += len;
  }
  return scale * total;
}

// ---------------------------------------------------------------------------------------------
// The vectorised kernels' interface: one table per instruction set (the part at the end of this
// file); each entry runs one parallel task.

enum Dt : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

template <typename scalar_t>
constexpr Dt dt_of() {
  return std::is_same<scalar_t, float>::value ? kF32 : std::is_same<scalar_t, c10::Half>::value ? kF16 : kBF16;
}

struct PairKdArgs {
  const void* logits;
  void* grad;  // nullptr: no gradient
  const int64_t* labels;
  const int64_t* partner;
  int64_t K;
  double inv_t;
  int64_t ignore_index;
  bool symmetric;
  double ce_scale, kd_loss_scale, kd_grad_scale;
  double* rows;  // rows[i]: the loss of the pair led by row i
};

struct KdArgs {
  const void* student;
  const void* teacher;
  void* grad;  // nullptr: no gradient
  int64_t K;
  double inv_t, grad_scale;
  double* rows;  // rows[i]: KL of row i
};

struct VecKernels {
  void (*pair_kd_rows)(Dt, const PairKdArgs&, int64_t begin, int64_t end);
  void (*kd_rows)(Dt, const KdArgs&, int64_t begin, int64_t end);
  double (*elementwise)(Dt, int64_t kind, const void* s, const void* t, void* g, int64_t begin, int64_t end,
                        double scale);
  double (*cosine)(Dt, const void* x, const void* y, void* g, int64_t begin, int64_t end, int64_t C, int64_t S,
                   bool channels_last, double scale);
};

}  // namespace
}  // namespace fastsd

#if defined(FASTSD_VECTOR_KERNELS)
#define FASTSD_LOSSES_ISA_PASS
#if defined(FASTSD_MULTI_ISA)
#define FASTSD_STR(x) #x
#define FASTSD_PRAGMA(x) _Pragma(FASTSD_STR(x))  // #pragma does not expand macros; _Pragma's argument does
#pragma GCC push_options
FASTSD_PRAGMA(GCC target(FASTSD_TARGET_AVX512))
#define FASTSD_ISA avx512
#define FASTSD_W 16
#include "losses.cpp"
#undef FASTSD_ISA
#undef FASTSD_W
#pragma GCC pop_options
#pragma GCC push_options
FASTSD_PRAGMA(GCC target(FASTSD_TARGET_AVX2))
#define FASTSD_ISA avx2
#define FASTSD_W 8
#include "losses.cpp"
#undef FASTSD_ISA
#undef FASTSD_W
#pragma GCC pop_options
#endif
#define FASTSD_ISA baseline
#define FASTSD_W 4
#include "losses.cpp"
#undef FASTSD_ISA
#undef FASTSD_W
#undef FASTSD_LOSSES_ISA_PASS
#endif

namespace fastsd {
namespace {

// The vectorised kernels of the path in use (cpu::cpu_isa()), or nullptr (no vector extensions:
// the generic templates).
const VecKernels* vec_kernels() {
  switch (cpu::cpu_isa()) {
#if defined(FASTSD_MULTI_ISA)
    case cpu::Isa::kAvx512:
      return &avx512::kernels;
    case cpu::Isa::kAvx2:
      return &avx2::kernels;
#endif
    default:
#if defined(FASTSD_VECTOR_KERNELS)
      return &baseline::kernels;
#else
      return nullptr;
#endif
  }
}

// ---------------------------------------------------------------------------------------------
// the ops

std::tuple<at::Tensor, at::Tensor> pair_kd_loss_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                    const at::Tensor& partner, double temperature,
                                                    double kd_weight, double ce_weight, bool symmetric,
                                                    int64_t ignore_index, bool compute_grad) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "fastsd_C.pair_kd_loss: logits must be contiguous [B, K]");
  const int64_t B = logits.size(0), K = logits.size(1);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == B && labels.scalar_type() == at::kLong && labels.is_contiguous(),
              "fastsd_C.pair_kd_loss: labels must be contiguous int64 [B]");
  TORCH_CHECK(partner.dim() == 1 && partner.size(0) == B && partner.scalar_type() == at::kLong &&
                  partner.is_contiguous(),
              "fastsd_C.pair_kd_loss: partner must be contiguous int64 [B]");
  TORCH_CHECK(temperature > 0, "fastsd_C.pair_kd_loss: temperature must be > 0");
  at::Tensor grad = compute_grad ? cpu::empty(logits.sizes(), logits.options()) : at::empty({0}, logits.options());
  const int64_t* y = labels.data_ptr<int64_t>();
  const int64_t* p = partner.data_ptr<int64_t>();
  int64_t n_valid = 0, n_paired = 0;
  for (int64_t i = 0; i < B; ++i) {
    // The public function leaves these checks to this loop (ValueError, as its own checks raise).
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < B && p[p[i]] == i,
                      "fastsd.pair_kd_loss: partner: partner must pair rows: partner[partner[i]] == i for every i "
                      "(e.g. from intra_class_pairs); partner[", i, "] = ", p[i]);
    const bool valid = y[i] != ignore_index;
    TORCH_CHECK_VALUE(!valid || (y[i] >= 0 && y[i] < K), "fastsd.pair_kd_loss: labels: labels must be in [0, K=", K,
                      ") or equal ignore_index=", ignore_index, "; labels[", i, "] = ", y[i]);
    n_valid += valid;
    n_paired += valid && p[i] != i && y[p[i]] != ignore_index;
  }
  const double ce_scale = ce_weight / static_cast<double>(std::max<int64_t>(n_valid, 1));
  const double n_pairs = std::max(0.5 * static_cast<double>(n_paired), 1.0);
  const double kd_loss_scale = kd_weight * temperature * temperature / n_pairs;
  const double kd_grad_scale = kd_weight * temperature / n_pairs;
  std::vector<double> rows(B, 0.0);
  if (K > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "pair_kd_loss_cpu", [&] {
      const scalar_t* z = logits.data_ptr<scalar_t>();
      scalar_t* g = compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
      const int64_t grain = std::max<int64_t>(1, 8192 / K);
      const VecKernels* vk = std::is_same<scalar_t, double>::value ? nullptr : vec_kernels();
      const PairKdArgs args{z, g, y, p, K, 1.0 / temperature, ignore_index, symmetric, ce_scale, kd_loss_scale,
                            kd_grad_scale, rows.data()};
      at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
        if (vk != nullptr) return vk->pair_kd_rows(dt_of<scalar_t>(), args, begin, end);
        for (int64_t i = begin; i < end; ++i) {
          if (p[i] < i) continue;  // the pair is led by its lower index
          rows[i] = pair_kd_pair<scalar_t>(z, g, y, i, p[i], K, 1.0 / temperature, ignore_index, symmetric,
                                           ce_scale, kd_loss_scale, kd_grad_scale);
        }
      });
    });
  }
  double total = 0;
  for (double r : rows) total += r;
  return {at::scalar_tensor(total, logits.options()), grad};
}

std::tuple<at::Tensor, at::Tensor> kd_loss_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                               double temperature, double loss_scale, double grad_scale,
                                               bool per_row, bool compute_grad) {
  TORCH_CHECK(student.dim() == 2 && student.is_contiguous() && teacher.sizes() == student.sizes() &&
                  teacher.is_contiguous() && teacher.scalar_type() == student.scalar_type(),
              "fastsd_C.kd_loss: student and teacher must be contiguous [B, K] of one dtype");
  TORCH_CHECK(temperature > 0, "fastsd_C.kd_loss: temperature must be > 0");
  const int64_t B = student.size(0), K = student.size(1);
  at::Tensor grad = compute_grad ? cpu::empty(student.sizes(), student.options()) : at::empty({0}, student.options());
  std::vector<double> rows(B, 0.0);
  if (K > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_loss_cpu", [&] {
      const scalar_t* zs = student.data_ptr<scalar_t>();
      const scalar_t* zt = teacher.data_ptr<scalar_t>();
      scalar_t* g = compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
      const VecKernels* vk = std::is_same<scalar_t, double>::value ? nullptr : vec_kernels();
      const KdArgs args{zs, zt, g, K, 1.0 / temperature, grad_scale, rows.data()};
      at::parallel_for(0, B, std::max<int64_t>(1, 8192 / K), [&](int64_t begin, int64_t end) {
        if (vk != nullptr) return vk->kd_rows(dt_of<scalar_t>(), args, begin, end);
        for (int64_t i = begin; i < end; ++i)
          rows[i] = kd_row<scalar_t>(zs + i * K, zt + i * K, g ? g + i * K : nullptr, K, 1.0 / temperature,
                                     grad_scale);
      });
    });
  }
  if (per_row) {
    at::Tensor out = at::empty({B}, student.options().dtype(at::kDouble));
    double* o = out.data_ptr<double>();
    for (int64_t i = 0; i < B; ++i) o[i] = loss_scale * rows[i];
    return {out.to(student.scalar_type()), grad};
  }
  double total = 0;
  for (double r : rows) total += r;
  return {at::scalar_tensor(loss_scale * total, student.options()), grad};
}

std::tuple<at::Tensor, at::Tensor> feature_alignment_loss_cpu(at::TensorList student, at::TensorList target,
                                                              c10::List<bool> channels_last, int64_t kind,
                                                              at::ArrayRef<double> scales, bool per_layer,
                                                              bool compute_grad) {
  const int64_t L = static_cast<int64_t>(student.size());
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(target.size()) == L &&
                  static_cast<int64_t>(channels_last.size()) == L && static_cast<int64_t>(scales.size()) == L,
              "fastsd_C.feature_alignment_loss: student, target, channels_last and scales must have one entry per layer");
  TORCH_CHECK(kind >= kMse && kind <= kCosine, "fastsd_C.feature_alignment_loss: unknown kind ", kind);
  const auto dtype = student[0].scalar_type();
  std::vector<int64_t> offset(L + 1, 0), positions(L), channels(L), spatial(L);
  std::vector<Task> tasks;
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& s = student[l];
    const at::Tensor& t = target[l];
    TORCH_CHECK(s.dim() >= 2 && s.sizes() == t.sizes() && s.strides() == t.strides() && s.scalar_type() == dtype &&
                    t.scalar_type() == dtype && s.device().is_cpu() && t.device().is_cpu(),
                "fastsd_C.feature_alignment_loss: layer ", l, ": student and target must be CPU tensors of one "
                "shape, layout and dtype");
    const bool cl = channels_last.get(l);
    TORCH_CHECK(cl ? s.movedim(1, -1).is_contiguous() : s.is_contiguous(),
                "fastsd_C.feature_alignment_loss: layer ", l, " is not dense in the stated layout");
    const int64_t n = s.numel();
    offset[l + 1] = offset[l] + n;
    channels[l] = s.size(1);
    positions[l] = channels[l] ? n / channels[l] : 0;
    spatial[l] = s.size(0) ? positions[l] / s.size(0) : 0;
    if (kind == kCosine) {
      // Channels first: a task reads a run of positions from every channel, so it takes at least
      // kMinRun positions (whole samples where a sample has fewer) to read whole cache lines.
      int64_t step = std::max<int64_t>(1, kChunk / std::max<int64_t>(channels[l], 1));
      if (!cl && step < kMinRun) {
        const int64_t S = std::max<int64_t>(spatial[l], 1);
        step = S >= kMinRun ? kMinRun : S * (kMinRun / S);
      }
      for (int64_t b = 0; b < positions[l]; b += step) tasks.push_back({l, b, std::min(positions[l], b + step)});
    } else {
      for (int64_t b = 0; b < n; b += kChunk) tasks.push_back({l, b, std::min(n, b + kChunk)});
    }
  }
  at::Tensor grad = cpu::empty({compute_grad ? offset[L] : 0}, student[0].options());  // huge pages when large
  std::vector<double> partial(tasks.size(), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "feature_alignment_loss_cpu", [&] {
    std::vector<const scalar_t*> sp(L), tp(L);
    for (int64_t l = 0; l < L; ++l) {
      sp[l] = student[l].data_ptr<scalar_t>();
      tp[l] = target[l].data_ptr<scalar_t>();
    }
    scalar_t* gp = compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
    const VecKernels* vk = std::is_same<scalar_t, double>::value ? nullptr : vec_kernels();
    at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const Task& tk = tasks[k];
        const int64_t l = tk.layer;
        scalar_t* g = gp ? gp + offset[l] : nullptr;
        if (vk != nullptr && kind == kCosine) {
          partial[k] = vk->cosine(dt_of<scalar_t>(), sp[l], tp[l], g, tk.begin, tk.end, channels[l], spatial[l],
                                  channels_last.get(l), scales[l]);
        } else if (vk != nullptr) {
          partial[k] = vk->elementwise(dt_of<scalar_t>(), kind, sp[l], tp[l], g, tk.begin, tk.end, scales[l]);
        } else if (kind == kCosine) {
          partial[k] = cosine_task<scalar_t>(sp[l], tp[l], g, tk.begin, tk.end, channels[l], spatial[l],
                                             channels_last.get(l), scales[l]);
        } else {
          partial[k] = elementwise_task<scalar_t>(sp[l], tp[l], g, tk.begin, tk.end, kind, scales[l]);
        }
      }
    });
  });
  std::vector<double> layer_loss(L, 0.0);
  for (size_t k = 0; k < tasks.size(); ++k) layer_loss[tasks[k].layer] += partial[k];
  if (per_layer) {
    at::Tensor out = at::empty({L}, student[0].options().dtype(at::kDouble));
    std::copy(layer_loss.begin(), layer_loss.end(), out.data_ptr<double>());
    return {out.to(dtype), grad};
  }
  double total = 0;
  for (double v : layer_loss) total += v;
  return {at::scalar_tensor(total, student[0].options()), grad};
}


}  // namespace
}  // namespace fastsd

TORCH_LIBRARY_IMPL(fastsd_C, CPU, m) {
  m.impl("pair_kd_loss", &fastsd::pair_kd_loss_cpu);
  m.impl("kd_loss", &fastsd::kd_loss_cpu);
  m.impl("feature_alignment_loss", &fastsd::feature_alignment_loss_cpu);
}

#else  // FASTSD_LOSSES_ISA_PASS
// ---------------------------------------------------------------------------------------------
// The vectorised float / half / bfloat16 kernels, compiled once per instruction set (FASTSD_ISA,
// FASTSD_W float lanes). GCC vector extensions: +, *, compares and ?: act lane-wise; casts
// between vector types of one size reinterpret the bits. Arithmetic is in float (as
// at::opmath_type says); every loop is over whole vectors, a row's last partial vector loaded
// padded and its lanes past the end masked out of the sums. Sums run in float lanes over at most
// kBlock vectors, then go to double in lane order, so a result depends on the instruction set
// (the lane count) but never on the number of threads.

namespace fastsd {
namespace {
namespace FASTSD_ISA {

constexpr int W = FASTSD_W;
constexpr int64_t kBlock = 256;  // vectors summed in float lanes before the sum goes to double
typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));
typedef uint32_t vu __attribute__((vector_size(4 * W)));
typedef uint16_t vh __attribute__((vector_size(2 * W)));

inline vf splat(float x) {
  vf v;
  for (int l = 0; l < W; ++l) v[l] = x;
  return v;
}
inline vu splat_u(uint32_t x) {
  vu v;
  for (int l = 0; l < W; ++l) v[l] = x;
  return v;
}
inline vf zero() { return splat(0.0f); }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline vf vabs(vf x) { return (vf)((vu)x & splat_u(0x7FFFFFFFu)); }
inline vf sign(vf d) {
  const vf one = splat(1.0f), z = zero();
  return (d > z ? one : z) - (d < z ? one : z);
}
inline vf select(vi mask, vf x) { return (vf)((vi)x & mask); }  // x where mask, else +0
inline vi lanes_below(int64_t n) {  // lane l < n
  vi m;
  for (int l = 0; l < W; ++l) m[l] = l < n ? -1 : 0;
  return m;
}
inline double hsum(vf v) {
  double s = 0;
  for (int l = 0; l < W; ++l) s += v[l];
  return s;
}
inline float hmax(vf v) {
  float m = v[0];
  for (int l = 1; l < W; ++l) m = v[l] > m ? v[l] : m;
  return m;
}

// exp: the scalar vexp above, lane-wise.
inline vf vexp(vf x) {
  const vf lo = splat(-87.3f), hi = splat(88.7f), magic = splat(12582912.0f);
  vf xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const vf n = (xc * splat(1.44269504088896341f) + magic) - magic;
  vf r = xc - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  vf p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  const vf y = p * r * r + r + splat(1.0f);
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  return x < lo ? zero() : y * (vf)bits;
}

// half <-> float as c10 converts them (c10/util/Half.h: fp16_ieee_to_fp32_value and
// fp16_ieee_from_fp32_value, round to nearest even), bfloat16 <-> float as c10/util/BFloat16.h.
inline vf half_to_float(vh h) {
  const vu w = __builtin_convertvector(h, vu) << 16;
  const vu sign_bits = w & splat_u(0x80000000u);
  const vu two_w = w + w;
  const vf normalized = (vf)((two_w >> 4) + splat_u(0xE0u << 23)) * splat(0x1.0p-112f);
  const vf denormalized = (vf)((two_w >> 17) | splat_u(126u << 23)) - splat(0.5f);
  return (vf)(sign_bits | (two_w < splat_u(1u << 27) ? (vu)denormalized : (vu)normalized));
}
inline vh float_to_half(vf f) {
  const vu w = (vu)f;
  vf base = (vabs(f) * splat(0x1.0p+112f)) * splat(0x1.0p-110f);
  const vu shl1_w = w + w;
  const vu sign_bits = w & splat_u(0x80000000u);
  vu bias = shl1_w & splat_u(0xFF000000u);
  bias = bias < splat_u(0x71000000u) ? splat_u(0x71000000u) : bias;
  base = (vf)((bias >> 1) + splat_u(0x07800000u)) + base;
  const vu bits = (vu)base;
  const vu nonsign = ((bits >> 13) & splat_u(0x00007C00u)) + (bits & splat_u(0x00000FFFu));
  const vu out = (sign_bits >> 16) | (shl1_w > splat_u(0xFF000000u) ? splat_u(0x7E00u) : nonsign);
  return __builtin_convertvector(out, vh);
}
inline vf bf16_to_float(vh h) { return (vf)(__builtin_convertvector(h, vu) << 16); }
inline vh float_to_bf16(vf f) {
  const vu u = (vu)f;
  const vu out = f != f ? splat_u(0x7FC0u) : (u + ((u >> 16) & splat_u(1u)) + splat_u(0x7FFFu)) >> 16;
  return __builtin_convertvector(out, vh);
}

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline vf load(const c10::Half* p) {
  vh h;
  std::memcpy(&h, p, sizeof(h));
  return half_to_float(h);
}
inline vf load(const c10::BFloat16* p) {
  vh h;
  std::memcpy(&h, p, sizeof(h));
  return bf16_to_float(h);
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
inline void store(c10::Half* p, vf v) {
  const vh h = float_to_half(v);
  std::memcpy(p, &h, sizeof(h));
}
inline void store(c10::BFloat16* p, vf v) {
  const vh h = float_to_bf16(v);
  std::memcpy(p, &h, sizeof(h));
}
// The first n (< W) elements, the other lanes `pad`; and the store of the first n lanes.
template <typename T>
inline vf load_n(const T* p, int64_t n, float pad) {
  float tmp[W];
  for (int l = 0; l < W; ++l) tmp[l] = l < n ? static_cast<float>(p[l]) : pad;
  return load(tmp);
}
template <typename T>
inline void store_n(T* p, vf v, int64_t n) {
  float tmp[W];
  store(tmp, v);
  for (int64_t l = 0; l < n; ++l) p[l] = static_cast<T>(tmp[l]);
}

inline int64_t padded(int64_t K) { return (K + W - 1) / W * W; }

// A row as floats: z itself when it is float and whole vectors, else converted into buf (padded
// with -inf to a whole vector). m: its max.
template <typename T>
const float* stage_row(const T* z, int64_t K, float* buf, float& m) {
  const float inf = std::numeric_limits<float>::infinity();
  const int64_t Kf = K - K % W;
  vf vm = splat(-inf);
  if (std::is_same<T, float>::value && Kf == K) {
    for (int64_t k = 0; k < K; k += W) vm = vmax(vm, load(z + k));
    m = hmax(vm);
    return reinterpret_cast<const float*>(z);
  }
  for (int64_t k = 0; k < Kf; k += W) {
    const vf v = load(z + k);
    store(buf + k, v);
    vm = vmax(vm, v);
  }
  if (Kf < K) {
    const vf v = load_n(z + Kf, K - Kf, -inf);
    store(buf + Kf, v);
    vm = vmax(vm, v);
  }
  m = hmax(vm);
  return buf;
}

// et[k] = exp((x[k] - m) * it) and, WITH1, e1[k] = exp(x[k] - m), over the padded row; their sums.
template <bool WITH1>
void exp_row(const float* x, int64_t Kp, float m, float it, float* e1, float* et, double& s1, double& st) {
  const vf vm = splat(m), vit = splat(it);
  s1 = st = 0;
  for (int64_t k0 = 0; k0 < Kp; k0 += kBlock * W) {
    const int64_t k1 = std::min(Kp, k0 + kBlock * W);
    vf a1 = zero(), at = zero();
    for (int64_t k = k0; k < k1; k += W) {
      const vf d = load(x + k) - vm;
      const vf vt = vexp(d * vit);
      store(et + k, vt);
      at += vt;
      if (WITH1) {
        const vf v1 = vexp(d);
        store(e1 + k, v1);
        a1 += v1;
      }
    }
    s1 += hsum(a1);
    st += hsum(at);
  }
}

// Writes a staged float gradient row out in T (nothing to do when g is the buffer itself).
template <typename T>
void unstage_row(const float* buf, T* g, int64_t K) {
  if (reinterpret_cast<const void*>(buf) == reinterpret_cast<const void*>(g)) return;
  const int64_t Kf = K - K % W;
  for (int64_t k = 0; k < Kf; k += W) store(g + k, load(buf + k));
  if (Kf < K) store_n(g + Kf, load(buf + Kf), K - Kf);
}

// ---------------------------------------------------------------------------------------------
// pair KD: as pair_kd_pair above. Per row: stage and max; the exps at temperatures 1 and T (kept);
// then one joint sweep over both rows for the two KL terms and both gradients.
//
// Equal rows give a KL and a KD gradient of exactly 0: every expression that compares the two
// rows is a difference of like-rounded values, with no product beside it that the compiler could
// contract into an FMA (which keeps the product unrounded for one row only): the KL terms use
// d = z - m (1/T applied once, in double), and p_i - p_j = (et_i - et_j * (st_i / st_j)) / st_i.

template <typename T>
double pair_kd_pair_vec(const PairKdArgs& a, const T* logits, T* grad, int64_t i, int64_t j, float* buf) {
  const int64_t K = a.K, Kp = padded(K);
  const bool valid_i = a.labels[i] != a.ignore_index, valid_j = j != i && a.labels[j] != a.ignore_index;
  // A row with an ignored label is not read: its gradient is 0, and its partner is a singleton.
  if (grad != nullptr && !valid_i) zero_row(grad + i * K, K);
  if (grad != nullptr && j != i && !valid_j) zero_row(grad + j * K, K);
  if (!valid_i && !valid_j) return 0.0;
  const float it = static_cast<float>(a.inv_t);
  float* xbi = buf;
  float* xbj = buf + Kp;
  float* e1i = buf + 2 * Kp;
  float* eti = buf + 3 * Kp;
  float* e1j = buf + 4 * Kp;
  float* etj = buf + 5 * Kp;
  const bool direct = std::is_same<T, float>::value && K % W == 0;  // gradient straight to grad
  if (!valid_i || !valid_j) {  // a singleton: the valid row's CE and its gradient
    const int64_t r = valid_i ? i : j, y = a.labels[r];
    float m = 0;
    double s1 = 1, st = 1;
    const float* x = stage_row(logits + r * K, K, xbi, m);
    exp_row<true>(x, Kp, m, it, e1i, eti, s1, st);
    const double loss = a.ce_scale * (m + std::log(s1) - static_cast<double>(x[y]));
    if (grad == nullptr) return loss;
    float* g = direct ? reinterpret_cast<float*>(grad + r * K) : e1i;
    const float e1y = e1i[y];
    const vf vc = splat(static_cast<float>(a.ce_scale / s1));
    for (int64_t k = 0; k < Kp; k += W) store(g + k, vc * load(e1i + k));
    g[y] = static_cast<float>(a.ce_scale) * (e1y * static_cast<float>(1.0 / s1) - 1.0f);
    unstage_row(g, grad + r * K, K);
    return loss;
  }
  // A pair, both labels valid.
  const int64_t yi = a.labels[i], yj = a.labels[j];
  float mi = 0, mj = 0;
  double s1i = 1, sti = 1, s1j = 1, stj = 1;
  const float* xi = stage_row(logits + i * K, K, xbi, mi);
  exp_row<true>(xi, Kp, mi, it, e1i, eti, s1i, sti);
  const float* xj = stage_row(logits + j * K, K, xbj, mj);
  exp_row<true>(xj, Kp, mj, it, e1j, etj, s1j, stj);
  const double lse1i = mi + std::log(s1i), lse1j = mj + std::log(s1j);
  const double loss = a.ce_scale * (lse1i - static_cast<double>(xi[yi])) +
                      a.ce_scale * (lse1j - static_cast<double>(xj[yj]));
  const bool i_teaches = !(xj[yj] - lse1j > xi[yi] - lse1i);  // ties (NaN too): the lower index, i
  const bool kd_i = a.symmetric || !i_teaches, kd_j = a.symmetric || i_teaches;  // row i (j) a student
  const double w = a.symmetric ? 0.5 : 1.0;

  float* gi = grad == nullptr ? nullptr : direct ? reinterpret_cast<float*>(grad + i * K) : e1i;
  float* gj = grad == nullptr ? nullptr : direct ? reinterpret_cast<float*>(grad + j * K) : e1j;
  const float cei = static_cast<float>(a.ce_scale / s1i);  // CE gradient: cei * e1i
  const float cej = static_cast<float>(a.ce_scale / s1j);
  const float ratio = static_cast<float>(sti / stj);
  const float kg = static_cast<float>(a.kd_grad_scale * w / sti);  // KD gradient of i: kg (et_i - ratio et_j)
  const int64_t Kf = K - K % W;
  // The label entries get the one-hot term afterwards, from scratch (e1 is overwritten by g).
  const float e1iy = e1i[yi], e1jy = e1j[yj];
  const vf vmi = splat(mi), vmj = splat(mj), vratio = splat(ratio), vkg = splat(kg);
  const vf vcei = splat(cei), vcej = splat(cej);
  const vi kdi = lanes_below(kd_i ? W : 0), kdj = lanes_below(kd_j ? W : 0);  // a teacher's KD part: +0
  // With d = z - m, log p = d / T - log st and p = et / st:
  //   KL(p_j || p_i) = (1/T) sum_k et_j (d_j - d_i) / st_j + log st_i - log st_j,
  // the row constants applied once, in double (no rounded log st in every term).
  double si = 0, sj = 0;  // sum et_j (d_j - d_i), sum et_i (d_i - d_j)
  auto sweep = [&](auto with_grad) {
    constexpr bool G = decltype(with_grad)::value;
    auto element = [&](int64_t k, vf& A, vf& B, vi mask) {
      const vf di = load(xi + k) - vmi, dj = load(xj + k) - vmj;
      const vf ei = load(eti + k), ej = load(etj + k);
      A += select(mask, ej * (dj - di));
      B += select(mask, ei * (di - dj));
      if (G) {
        const vf kd = vkg * (ei - ej * vratio);  // kd_grad_scale * w * (p_i - p_j)
        store(gi + k, vcei * load(e1i + k) + select(kdi, kd));
        store(gj + k, vcej * load(e1j + k) - select(kdj, kd));
      }
    };
    const vi all = lanes_below(W);
    for (int64_t k0 = 0; k0 < Kf; k0 += kBlock * W) {
      const int64_t k1 = std::min(Kf, k0 + kBlock * W);
      vf A = zero(), B = zero();
      for (int64_t k = k0; k < k1; k += W) element(k, A, B, all);
      si += hsum(A);
      sj += hsum(B);
    }
    if (Kf < K) {
      vf A = zero(), B = zero();
      element(Kf, A, B, lanes_below(K - Kf));
      si += hsum(A);
      sj += hsum(B);
    }
  };
  if (gi) {
    sweep(std::true_type{});
    const float ce = static_cast<float>(a.ce_scale);
    auto kd_at = [&](int64_t k) { return kg * (eti[k] - etj[k] * ratio); };
    gi[yi] = ce * (e1iy * static_cast<float>(1.0 / s1i) - 1.0f) + (kd_i ? kd_at(yi) : 0.0f);
    gj[yj] = ce * (e1jy * static_cast<float>(1.0 / s1j) - 1.0f) - (kd_j ? kd_at(yj) : 0.0f);
    unstage_row(gi, grad + i * K, K);
    unstage_row(gj, grad + j * K, K);
  } else {
    sweep(std::false_type{});
  }
  const double log_ratio = std::log(sti / stj);  // log st_i - log st_j
  double kd = 0;
  if (kd_i) kd += w * (a.inv_t * si / stj + log_ratio);  // KL(p_j || p_i): row i learns from j
  if (kd_j) kd += w * (a.inv_t * sj / sti - log_ratio);
  return loss + a.kd_loss_scale * kd;
}

template <typename T>
void pair_kd_rows(const PairKdArgs& a, int64_t begin, int64_t end) {
  std::unique_ptr<float[]> buf(new float[6 * padded(a.K)]);
  const T* z = static_cast<const T*>(a.logits);
  T* g = static_cast<T*>(a.grad);
  for (int64_t i = begin; i < end; ++i) {
    if (a.partner[i] < i) continue;  // the pair is led by its lower index
    a.rows[i] = pair_kd_pair_vec<T>(a, z, g, i, a.partner[i], buf.get());
  }
}

void pair_kd_rows_any(Dt dt, const PairKdArgs& a, int64_t begin, int64_t end) {
  switch (dt) {
    case kF32: return pair_kd_rows<float>(a, begin, end);
    case kF16: return pair_kd_rows<c10::Half>(a, begin, end);
    default: return pair_kd_rows<c10::BFloat16>(a, begin, end);
  }
}

// ---------------------------------------------------------------------------------------------
// classic KD, one row: stage both rows, their exps at temperature T, one sweep for KL and grad.

template <typename T>
void kd_rows(const KdArgs& a, int64_t begin, int64_t end) {
  const int64_t K = a.K, Kp = padded(K), Kf = K - K % W;
  std::unique_ptr<float[]> buf(new float[4 * Kp]);
  float* xbs = buf.get();
  float* xbt = xbs + Kp;
  float* es = xbs + 2 * Kp;
  float* et = xbs + 3 * Kp;
  const float it = static_cast<float>(a.inv_t);
  const bool direct = std::is_same<T, float>::value && K % W == 0;
  for (int64_t i = begin; i < end; ++i) {
    float ms, mt;
    double ss, st, unused;
    const float* xs = stage_row(static_cast<const T*>(a.student) + i * K, K, xbs, ms);
    const float* xt = stage_row(static_cast<const T*>(a.teacher) + i * K, K, xbt, mt);
    exp_row<false>(xs, Kp, ms, it, nullptr, es, unused, ss);
    exp_row<false>(xt, Kp, mt, it, nullptr, et, unused, st);
    T* gout = a.grad == nullptr ? nullptr : static_cast<T*>(a.grad) + i * K;
    float* g = gout == nullptr ? nullptr : direct ? reinterpret_cast<float*>(gout) : es;
    const vf vms = splat(ms), vmt = splat(mt);
    // q - p = (es - et * (ss / st)) / ss; with d = z - m,
    // KL(p || q) = (1/T) sum_k et_k (dt_k - ds_k) / st + log ss - log st (as in pair KD: equal rows give 0).
    const vf vratio = splat(static_cast<float>(ss / st)), vk = splat(static_cast<float>(a.grad_scale / ss));
    auto element = [&](int64_t k, vf& A, vi mask) {
      const vf ds = load(xs + k) - vms, dt = load(xt + k) - vmt;
      const vf e = load(et + k);
      A += select(mask, e * (dt - ds));
      if (g) store(g + k, vk * (load(es + k) - e * vratio));
    };
    double sum = 0;
    const vi all = lanes_below(W);
    for (int64_t k0 = 0; k0 < Kf; k0 += kBlock * W) {
      const int64_t k1 = std::min(Kf, k0 + kBlock * W);
      vf A = zero();
      for (int64_t k = k0; k < k1; k += W) element(k, A, all);
      sum += hsum(A);
    }
    if (Kf < K) {
      vf A = zero();
      element(Kf, A, lanes_below(K - Kf));
      sum += hsum(A);
    }
    const double kl = a.inv_t * sum / st + std::log(ss / st);
    if (g) unstage_row(g, gout, K);
    a.rows[i] = kl;
  }
}

void kd_rows_any(Dt dt, const KdArgs& a, int64_t begin, int64_t end) {
  switch (dt) {
    case kF32: return kd_rows<float>(a, begin, end);
    case kF16: return kd_rows<c10::Half>(a, begin, end);
    default: return kd_rows<c10::BFloat16>(a, begin, end);
  }
}

// ---------------------------------------------------------------------------------------------
// feature alignment

template <int64_t KIND>
inline void elementwise_vec(vf d, vf& e, vf& g) {
  if (KIND == kMse) {
    e = d * d;
    g = d + d;
  } else if (KIND == kL1) {
    e = vabs(d);
    g = sign(d);
  } else {
    const vf ad = vabs(d);
    const vi small = ad < splat(1.0f);
    e = small ? splat(0.5f) * d * d : ad - splat(0.5f);
    const vf one = splat(1.0f), minus_one = splat(-1.0f);
    g = d > one ? one : (d < minus_one ? minus_one : d);  // clamp(d, -1, 1), keeps NaN as torch does
  }
}

template <int64_t KIND, bool G, typename T>
double elementwise_vec_task(const T* s, const T* t, T* g, int64_t begin, int64_t end, double scale) {
  const vf sc = splat(static_cast<float>(scale));
  double total = 0;
  const int64_t endf = end - (end - begin) % W;
  for (int64_t k0 = begin; k0 < endf; k0 += kBlock * W) {
    const int64_t k1 = std::min(endf, k0 + kBlock * W);
    vf acc = zero();
    for (int64_t k = k0; k < k1; k += W) {
      vf e, gk;
      elementwise_vec<KIND>(load(s + k) - load(t + k), e, gk);
      acc += e;
      if (G) store(g + k, sc * gk);
    }
    total += hsum(acc);
  }
  if (endf < end) {  // zero padding: d = 0 adds nothing
    vf e, gk;
    elementwise_vec<KIND>(load_n(s + endf, end - endf, 0.0f) - load_n(t + endf, end - endf, 0.0f), e, gk);
    total += hsum(e);
    if (G) store_n(g + endf, sc * gk, end - endf);
  }
  return scale * total;
}

template <typename T>
double elementwise_typed(int64_t kind, const T* s, const T* t, T* g, int64_t begin, int64_t end, double scale) {
  if (g) {
    switch (kind) {
      case kMse: return elementwise_vec_task<kMse, true>(s, t, g, begin, end, scale);
      case kL1: return elementwise_vec_task<kL1, true>(s, t, g, begin, end, scale);
      default: return elementwise_vec_task<kSmoothL1, true>(s, t, g, begin, end, scale);
    }
  }
  switch (kind) {
    case kMse: return elementwise_vec_task<kMse, false>(s, t, g, begin, end, scale);
    case kL1: return elementwise_vec_task<kL1, false>(s, t, g, begin, end, scale);
    default: return elementwise_vec_task<kSmoothL1, false>(s, t, g, begin, end, scale);
  }
}

double elementwise_any(Dt dt, int64_t kind, const void* s, const void* t, void* g, int64_t begin, int64_t end,
                       double scale) {
  switch (dt) {
    case kF32:
      return elementwise_typed(kind, static_cast<const float*>(s), static_cast<const float*>(t),
                               static_cast<float*>(g), begin, end, scale);
    case kF16:
      return elementwise_typed(kind, static_cast<const c10::Half*>(s), static_cast<const c10::Half*>(t),
                               static_cast<c10::Half*>(g), begin, end, scale);
    default:
      return elementwise_typed(kind, static_cast<const c10::BFloat16*>(s), static_cast<const c10::BFloat16*>(t),
                               static_cast<c10::BFloat16*>(g), begin, end, scale);
  }
}

// Cosine over positions [begin, end) of a layer [N, C, *spatial], as cosine_task above.
template <typename T>
double cosine_vec_task(const T* x, const T* y, T* g, int64_t begin, int64_t end, int64_t C, int64_t S,
                       bool channels_last, double scale) {
  double total = 0;
  auto finish = [&](double dot, double xx, double yy, float& ky, float& kx) {
    const double nx = std::sqrt(xx);
    const double ax = std::max(nx, kCosineEps);
    const double ay = std::max(std::sqrt(yy), kCosineEps);
    const double c = dot / (ax * ay);
    total += 1.0 - c;
    ky = static_cast<float>(-scale / (ax * ay));
    kx = nx > kCosineEps ? static_cast<float>(scale * c / (nx * nx)) : 0.0f;
  };
  if (channels_last) {
    const int64_t Cf = C - C % W;
    for (int64_t q = begin; q < end; ++q) {
      const T* xq = x + q * C;
      const T* yq = y + q * C;
      vf dot = zero(), xx = zero(), yy = zero();
      for (int64_t c = 0; c < Cf; c += W) {
        const vf a = load(xq + c), b = load(yq + c);
        dot += a * b;
        xx += a * a;
        yy += b * b;
      }
      if (Cf < C) {
        const vf a = load_n(xq + Cf, C - Cf, 0.0f), b = load_n(yq + Cf, C - Cf, 0.0f);
        dot += a * b;
        xx += a * a;
        yy += b * b;
      }
      float ky, kx;
      finish(hsum(dot), hsum(xx), hsum(yy), ky, kx);
      if (g) {
        const vf vky = splat(ky), vkx = splat(kx);
        T* gq = g + q * C;
        for (int64_t c = 0; c < Cf; c += W) store(gq + c, vky * load(yq + c) + vkx * load(xq + c));
        if (Cf < C)
          store_n(gq + Cf, vky * load_n(yq + Cf, C - Cf, 0.0f) + vkx * load_n(xq + Cf, C - Cf, 0.0f), C - Cf);
      }
    }
    return scale * total;
  }
  // Channels first: a run of positions of one sample is contiguous in every channel; the sums of
  // the run's positions are vectors across the run.
  constexpr int64_t kRun = 256;
  static_assert(kRun % W == 0, "runs are whole vectors");
  alignas(64) float dot[kRun], xx[kRun], yy[kRun], ky[kRun], kx[kRun];
  for (int64_t q0 = begin; q0 < end;) {
    const int64_t n = q0 / S, s0 = q0 % S;
    const int64_t len = std::min({kRun, S - s0, end - q0});
    const int64_t lenf = len - len % W;
    const int64_t base = n * C * S + s0;
    std::fill(dot, dot + padded(len), 0.0f);
    std::fill(xx, xx + padded(len), 0.0f);
    std::fill(yy, yy + padded(len), 0.0f);
    for (int64_t c = 0; c < C; ++c) {
      const T* xc = x + base + c * S;
      const T* yc = y + base + c * S;
      auto accumulate = [&](int64_t r, vf a, vf b) {
        store(dot + r, load(dot + r) + a * b);
        store(xx + r, load(xx + r) + a * a);
        store(yy + r, load(yy + r) + b * b);
      };
      for (int64_t r = 0; r < lenf; r += W) accumulate(r, load(xc + r), load(yc + r));
      if (lenf < len) accumulate(lenf, load_n(xc + lenf, len - lenf, 0.0f), load_n(yc + lenf, len - lenf, 0.0f));
    }
    for (int64_t r = 0; r < len; ++r) finish(dot[r], xx[r], yy[r], ky[r], kx[r]);
    if (g) {
      for (int64_t c = 0; c < C; ++c) {
        const T* xc = x + base + c * S;
        const T* yc = y + base + c * S;
        T* gc = g + base + c * S;
        for (int64_t r = 0; r < lenf; r += W) store(gc + r, load(ky + r) * load(yc + r) + load(kx + r) * load(xc + r));
        if (lenf < len) {
          const int64_t m = len - lenf;
          const vf gv = load(ky + lenf) * load_n(yc + lenf, m, 0.0f) + load(kx + lenf) * load_n(xc + lenf, m, 0.0f);
          store_n(gc + lenf, gv, m);
        }
      }
    }
    q0 += len;
  }
  return scale * total;
}

double cosine_any(Dt dt, const void* x, const void* y, void* g, int64_t begin, int64_t end, int64_t C, int64_t S,
                  bool channels_last, double scale) {
  switch (dt) {
    case kF32:
      return cosine_vec_task(static_cast<const float*>(x), static_cast<const float*>(y), static_cast<float*>(g),
                             begin, end, C, S, channels_last, scale);
    case kF16:
      return cosine_vec_task(static_cast<const c10::Half*>(x), static_cast<const c10::Half*>(y),
                             static_cast<c10::Half*>(g), begin, end, C, S, channels_last, scale);
    default:
      return cosine_vec_task(static_cast<const c10::BFloat16*>(x), static_cast<const c10::BFloat16*>(y),
                             static_cast<c10::BFloat16*>(g), begin, end, C, S, channels_last, scale);
  }
}

const VecKernels kernels = {&pair_kd_rows_any, &kd_rows_any, &elementwise_any, &cosine_any};

}  // namespace FASTSD_ISA
}  // namespace
}  // namespace fastsd

#endif  // FASTSD_LOSSES_ISA_PASS
