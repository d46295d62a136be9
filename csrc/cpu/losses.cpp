// CPU kernels of the fused distillation losses (schemas and formulas: csrc/losses.cpp).
//
// Each kernel reads its inputs once per pass (a row of logits stays in cache between the passes
// over it), computes the loss and, when asked, the gradient in the same sweep. Arithmetic is in
// at::opmath_type (float for half/bfloat16/float, double for double); sums across elements are
// accumulated per task in double and the per-task partials are added in a fixed order, so results
// do not depend on the number of threads.
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
#include <tuple>
#include <type_traits>
#include <vector>

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

template <typename scalar_t>
double pair_kd_pair(const scalar_t* logits, scalar_t* grad, const int64_t* labels, int64_t i, int64_t j,
                    int64_t K, double inv_t, int64_t ignore_index, bool symmetric, double ce_scale,
                    double kd_loss_scale, double kd_grad_scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool has_j = j != i;
  const bool vi = labels[i] != ignore_index, vj = has_j && labels[j] != ignore_index;
  const scalar_t* zi = logits + i * K;
  const scalar_t* zj = logits + j * K;
  const RowStats si = row_stats(zi, K, inv_t, vi ? labels[i] : -1, true);
  const RowStats sj = has_j ? row_stats(zj, K, inv_t, vj ? labels[j] : -1, true) : RowStats();
  double loss = 0;
  if (vi) loss += ce_scale * (si.lse1() - si.zy);
  if (vj) loss += ce_scale * (sj.lse1() - sj.zy);
  const bool pair_on = vi && vj;
  double ci = 0, cj = 0;  // weight of row i (j) as a student
  if (pair_on) {
    if (symmetric) {
      ci = cj = 0.5;
    } else {
      const bool i_teaches = si.zy - si.lse1() >= sj.zy - sj.lse1();  // ties: the lower index, i
      ci = i_teaches ? 0.0 : 1.0;
      cj = i_teaches ? 1.0 : 0.0;
    }
  }
  if (!pair_on && grad == nullptr) return loss;

  const acc_t it = static_cast<acc_t>(inv_t);
  const acc_t mi = static_cast<acc_t>(si.m), mj = static_cast<acc_t>(sj.m);
  const acc_t lsti = static_cast<acc_t>(si.log_st), lstj = static_cast<acc_t>(sj.log_st);
  const acc_t lse1i = static_cast<acc_t>(si.lse1()), lse1j = static_cast<acc_t>(sj.lse1());
  const acc_t cei = vi ? static_cast<acc_t>(ce_scale) : acc_t(0), cej = vj ? static_cast<acc_t>(ce_scale) : acc_t(0);
  const acc_t gi_kd = static_cast<acc_t>(kd_grad_scale * ci), gj_kd = static_cast<acc_t>(kd_grad_scale * cj);
  const int64_t yi = vi ? labels[i] : -1, yj = vj ? labels[j] : -1;
  double kl_i = 0, kl_j = 0;
  scalar_t* gi = grad ? grad + i * K : nullptr;
  scalar_t* gj = grad ? grad + j * K : nullptr;
  if (has_j) {
    // One element: the two KL terms and, when asked, both gradient entries (the one-hot of the
    // label is subtracted after the loop, which keeps the loop free of integer compares).
    auto element = [&](int64_t k, acc_t& a, acc_t& b, auto with_grad) {
      const acc_t xi = static_cast<acc_t>(zi[k]), xj = static_cast<acc_t>(zj[k]);
      const acc_t lpi = (xi - mi) * it - lsti, lpj = (xj - mj) * it - lstj;
      const acc_t pi = vexp(lpi), pj = vexp(lpj);
      a += pj * (lpj - lpi);  // KL(p_j || p_i): row i learns from j
      b += pi * (lpi - lpj);
      if constexpr (decltype(with_grad)::value) {
        gi[k] = static_cast<scalar_t>(cei * vexp(xi - lse1i) + gi_kd * (pi - pj));
        gj[k] = static_cast<scalar_t>(cej * vexp(xj - lse1j) + gj_kd * (pj - pi));
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
        if (k < 0) continue;
        const acc_t xi = static_cast<acc_t>(zi[k]), xj = static_cast<acc_t>(zj[k]);
        const acc_t pi = vexp((xi - mi) * it - lsti), pj = vexp((xj - mj) * it - lstj);
        gi[k] = static_cast<scalar_t>(cei * (vexp(xi - lse1i) - acc_t(k == yi)) + gi_kd * (pi - pj));
        gj[k] = static_cast<scalar_t>(cej * (vexp(xj - lse1j) - acc_t(k == yj)) + gj_kd * (pj - pi));
      }
    } else {
      sweep(std::false_type{});
    }
  } else if (gi) {  // a singleton: its CE gradient only
    for (int64_t k = 0; k < K; ++k) {
      const acc_t xi = static_cast<acc_t>(zi[k]);
      gi[k] = static_cast<scalar_t>(cei * (vexp(xi - lse1i) - acc_t(k == yi)));
    }
  }
  return loss + kd_loss_scale * (ci * kl_i + cj * kl_j);
}

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
  at::Tensor grad = compute_grad ? at::empty_like(logits) : at::empty({0}, logits.options());
  const int64_t* y = labels.data_ptr<int64_t>();
  const int64_t* p = partner.data_ptr<int64_t>();
  int64_t n_valid = 0, n_paired = 0;
  for (int64_t i = 0; i < B; ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < B && p[p[i]] == i, "fastsd_C.pair_kd_loss: partner must be an involution");
    const bool valid = y[i] != ignore_index;
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
      at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
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

std::tuple<at::Tensor, at::Tensor> kd_loss_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                               double temperature, double loss_scale, double grad_scale,
                                               bool per_row, bool compute_grad) {
  TORCH_CHECK(student.dim() == 2 && student.is_contiguous() && teacher.sizes() == student.sizes() &&
                  teacher.is_contiguous() && teacher.scalar_type() == student.scalar_type(),
              "fastsd_C.kd_loss: student and teacher must be contiguous [B, K] of one dtype");
  TORCH_CHECK(temperature > 0, "fastsd_C.kd_loss: temperature must be > 0");
  const int64_t B = student.size(0), K = student.size(1);
  at::Tensor grad = compute_grad ? at::empty_like(student) : at::empty({0}, student.options());
  std::vector<double> rows(B, 0.0);
  if (K > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_loss_cpu", [&] {
      const scalar_t* zs = student.data_ptr<scalar_t>();
      const scalar_t* zt = teacher.data_ptr<scalar_t>();
      scalar_t* g = compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, B, std::max<int64_t>(1, 8192 / K), [&](int64_t begin, int64_t end) {
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

// ---------------------------------------------------------------------------------------------
// feature alignment: all layers in one parallel loop over (layer, chunk) tasks.

enum Kind : int64_t { kMse = 0, kL1 = 1, kSmoothL1 = 2, kCosine = 3 };
constexpr double kCosineEps = 1e-8;
constexpr int64_t kChunk = 16384;  // elements (or positions x channels) per task

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
    g = ad < acc_t(1) ? d : sgn;
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
      const int64_t step = std::max<int64_t>(1, kChunk / std::max<int64_t>(channels[l], 1));
      for (int64_t b = 0; b < positions[l]; b += step) tasks.push_back({l, b, std::min(positions[l], b + step)});
    } else {
      for (int64_t b = 0; b < n; b += kChunk) tasks.push_back({l, b, std::min(n, b + kChunk)});
    }
  }
  at::Tensor grad = compute_grad ? at::empty({offset[L]}, student[0].options()) : at::empty({0}, student[0].options());
  std::vector<double> partial(tasks.size(), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "feature_alignment_loss_cpu", [&] {
    std::vector<const scalar_t*> sp(L), tp(L);
    for (int64_t l = 0; l < L; ++l) {
      sp[l] = student[l].data_ptr<scalar_t>();
      tp[l] = target[l].data_ptr<scalar_t>();
    }
    scalar_t* gp = compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const Task& tk = tasks[k];
        const int64_t l = tk.layer;
        scalar_t* g = gp ? gp + offset[l] : nullptr;
        if (kind == kCosine) {
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
