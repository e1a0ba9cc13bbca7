// The CUDA forward's online softmax state and its fold/merge steps, __host__ __device__ so that
// tests/cuda_host/fwd_sum_check.cu can compile the very same code as host code and replay one
// block's summation order on the CPU (no GPU needed).
//
// State of one thread (or a merged group of threads), in base 2:
//   zmax: the largest raw logit seen (-inf if none),
//   n   : the number of elements with d == 0 exactly (the max term(s), each exactly 1),
//   s   : sum of 2^d_v over the other elements, d_v = (z_v - ref) * c2, ref = max(zmax, -FLT_MAX),
//         c2 = log2(e) / tau,
//   r   : sum_v 2^d_v * d_v (entropy only).
// The max term is counted in n, never added into s: a float that already holds 1 rounds away every
// later term below half an ulp of 1 (6e-8), and on a confident row (p_label near 1) the tail is made
// of ~1e5 such terms, so the old single sum was biased the same way on every row (issue #18). When
// the max grows, n and s are rescaled into s together. The finite floor on ref keeps
// (-inf) - (-inf) = NaN out of rows that start with -inf logits.
#pragma once
#include <cfloat>
#include <cmath>

#include "common.cuh"

// The forward's exponential: the software exp2 (default; no systematic error) or, with
// -DVESPO_FWD_EXP_MUFU=1 (CMake: -DVESPO_FWD_EXP=mufu), the hardware ex2.approx. Kept selectable
// until a GPU run shows MUFU within the float64 budgets (issue #18 part 2).
#ifndef VESPO_FWD_EXP_MUFU
#define VESPO_FWD_EXP_MUFU 0
#endif

namespace vespo {
namespace cuda {
namespace detail {

#if defined(__CUDACC__)
#define VESPO_SM_HD __host__ __device__ __forceinline__
#else
#define VESPO_SM_HD inline
#endif

VESPO_SM_HD float fwd_exp2(float x) {
#if VESPO_FWD_EXP_MUFU && defined(__CUDA_ARCH__)
  return ex2(x);
#else
  return exp2_poly(x);
#endif
}

// The exponential as a type, so a kernel can be instantiated for each (issue #18 part 2: v2 picks it
// at run time). FwdExp is v1's compile-time choice above.
struct FwdExp {
  static VESPO_SM_HD float ex2(float x) { return fwd_exp2(x); }
};
struct PolyExp {
  static VESPO_SM_HD float ex2(float x) { return exp2_poly(x); }
};
// ex2.approx (MUFU) on the whole argument: one instruction, error of unknown mean (measure it first:
// benchmarks/gpu/ex2_error_scan.cu). On the host (replays) exp2f stands in.
struct MufuExp {
  static VESPO_SM_HD float ex2(float x) {
#if defined(__CUDA_ARCH__)
    return detail::ex2(x);
#else
    return exp2f(x);
#endif
  }
};
// MUFU on the argument rounded to 1/256 (h), times a degree-2 polynomial in the exact remainder
// l = x - h, |l| <= 2^-9: its truncation error (l ln2)^3 / 6 < 6e-10 keeps the mean error that of
// MUFU on the 1/256 grid. A degree-1 factor would leave a one-sided error of up to (l ln2)^2 / 2 =
// 9e-7, far above the 1e-8 per-token budget. x < -127 gives 0 (MUFU flushes 2^-127); NaN stays NaN.
struct SplitExp {
  static VESPO_SM_HD float ex2(float x) {
    const float xc = x < -127.f ? -127.f : x;      // -inf must not reach x - h (inf - inf)
    const float h = rintf(xc * 256.f) * (1.f / 256.f);  // exact for |x| < 2^15
    const float l = xc - h;                        // exact
    return MufuExp::ex2(h) * fmaf(l, fmaf(l, 0.2402265069591007f, 0.6931471805599453f), 1.f);
  }
};

struct SmState {
  float zmax, n, s, r;
};

// c2 = log2(e) * inv_temperature as hi + lo (hi rounded toward zero, so lo > 0): x * c2 with one
// rounding. A plain fp32 c2 is off by ~1.3e-8 relative, the same way for every element: it scaled
// every d_v, biased ln(s) by ~6e-8 per token on random 151936-wide rows (emulated in numpy) and, summed
// over a 2048-token sequence, put a 6e-4 relative error on the loss (measured on an H200).
// With lo > 0, x = -inf gives -inf (never -inf + inf).
struct Scale2 {
  float hi, lo;
};

VESPO_SM_HD Scale2 make_c2(float inv_temperature) {
  const double c = static_cast<double>(inv_temperature) * 1.4426950408889634;
  float hi = static_cast<float>(c);  // round to nearest, then toward zero if it went up (c > 0)
  if (static_cast<double>(hi) >= c) hi = nextafterf(hi, 0.f);
  return {hi, static_cast<float>(c - static_cast<double>(hi))};
}

VESPO_SM_HD float scale2(float x, Scale2 c) { return fmaf(x, c.hi, x * c.lo); }

VESPO_SM_HD float ref_of(float zmax) { return fmaxf(zmax, -FLT_MAX); }

// Folds N logits into the state: one rescale per call (if the max grew), then N exponentials.
// zm = max_j z[j] (fmaxf semantics: NaNs ignored), computed by the caller (v2 takes it on packed
// 16-bit pairs).
template <int N, bool ENT, class X = FwdExp>
VESPO_SM_HD void fold_max(SmState& st, const float (&z)[N], float zm, Scale2 c2) {
  if (zm > st.zmax) {  // false for NaN: a NaN logit then reaches s below and propagates
    const float dm = scale2(ref_of(st.zmax) - ref_of(zm), c2);  // < 0, possibly -inf
    const float sc = X::ex2(dm);
    const float tot = st.n + st.s;
    // r' = sum 2^(d + dm) (d + dm) = sc * (r + dm * (n + s)); guarded so -inf * 0 cannot occur.
    if (ENT) st.r = sc == 0.f ? 0.f : sc * fmaf(dm, tot, st.r);
    st.s = tot * sc;
    st.n = 0.f;
    st.zmax = zm;
  }
  const float ref = ref_of(st.zmax);
  float t[N];
#pragma unroll
  for (int j = 0; j < N; ++j) {
    float d = scale2(z[j] - ref, c2);
    if (ENT) d = d < -256.f ? -256.f : d;  // -inf logit: e = 0 and e * d = 0, not 0 * -inf (NaN kept)
    const float e = X::ex2(d);
    const bool one = d == 0.f;  // a max element: counted exactly
    st.n += one ? 1.f : 0.f;
    t[j] = one ? 0.f : e;
    if (ENT) st.r = fmaf(e, d, st.r);
  }
  // The batch's terms summed as a pairwise tree, then added to s once: a thread adds ~300 terms per
  // row, and one sequential fp32 sum of them was biased on 16-bit logits (-1.3e-8 per token on
  // confident bf16 rows in the host replay: their values repeat, so the roundings do not average out);
  // the tree (same number of adds, more independent ones) leaves -2e-9.
#pragma unroll
  for (int w = 1; w < N; w *= 2) {
#pragma unroll
    for (int j = 0; j + w < N; j += 2 * w) t[j] += t[j + w];
  }
  st.s += t[0];
}

template <int N, bool ENT, class X = FwdExp>
VESPO_SM_HD void fold(SmState& st, const float (&z)[N], Scale2 c2) {
  float zm = z[0];
#pragma unroll
  for (int j = 1; j < N; ++j) zm = fmaxf(zm, z[j]);
  fold_max<N, ENT, X>(st, z, zm, c2);
}

// One side of a merge: the state re-expressed relative to the merged max (d = its shift, <= 0).
template <bool ENT, class X = FwdExp>
VESPO_SM_HD void rebase(float d, float& n, float& s, float& r) {
  if (d == 0.f) return;  // this side holds the merged max: its count stays exact
  const float f = X::ex2(d), tot = n + s;
  if (ENT) r = f == 0.f ? 0.f : f * fmaf(d, tot, r);
  s = tot * f;
  n = 0.f;
}

// a <- a (+) b. Symmetric in its two operands (the sums commute exactly).
template <bool ENT, class X = FwdExp>
VESPO_SM_HD void merge(SmState& a, SmState b, Scale2 c2) {
  const float M = fmaxf(a.zmax, b.zmax);
  const float RM = ref_of(M);
  rebase<ENT, X>(scale2(ref_of(a.zmax) - RM, c2), a.n, a.s, a.r);
  rebase<ENT, X>(scale2(ref_of(b.zmax) - RM, c2), b.n, b.s, b.r);
  a.n += b.n;
  a.s += b.s;
  if (ENT) a.r += b.r;
  a.zmax = M;
}

// ln of the row's sum n + s: ln(n) + log1p(s / n), exact for the max term(s); n is 0 only for rows
// without a finite maximum (all -inf, or NaN), where ln(s) gives -inf or NaN as torch does.
VESPO_SM_HD float ln_sum(const SmState& a) {
  return a.n > 0.f ? logf(a.n) + log1pf(a.s / a.n) : logf(a.s);
}

// log p_y = (z_y - zmax) / tau - ln s, at most 0 (rounding could leave +1 ulp). For a near-certain
// label (z_y = zmax, n = 1) this is -log1p(s): its loss survives where fp32 1 + s would round to 1.
VESPO_SM_HD float label_logp(float zy, const SmState& a, float inv_t, float ln_s) {
  return fminf((zy - a.zmax) * inv_t - ln_s, 0.f);
}

#if defined(__CUDACC__)
// The forward's per-row outputs, written by one thread from the row's merged state:
// s = sum_v e^{(z_v - zmax)/tau} = n + s, lse = zmax / tau + ln(s), log p_y = (z_y - zmax) / tau - ln(s),
// H = ln(s) - ln2 * r / s (r is in base 2); a counted row whose label is outside [0, V) (and not
// ignore_index) is reported through bad_label_row.
template <bool ENT>
__device__ __forceinline__ void write_row(const LogprobParams& p, int64_t t, const SmState& a, float zy,
                                          bool has_label, bool bad_label) {
  const float ln_s = ln_sum(a);
  const float inv_t = p.inv_temperature;
  p.lse[t] = a.zmax * inv_t + ln_s;
  if (p.row_max != nullptr) {
    p.row_max[t] = a.zmax;
    p.log_sum[t] = ln_s;
  }
  p.logp[t] = has_label ? label_logp(zy, a, inv_t, ln_s) : 0.f;
  if (ENT) p.entropy[t] = ln_s - kLn2 * a.r / (a.n + a.s);
  if (bad_label && p.bad_label_row != nullptr)
    atomicMax(reinterpret_cast<unsigned long long*>(p.bad_label_row), static_cast<unsigned long long>(t + 1));
}

// A masked row's outputs: all 0.
template <bool ENT>
__device__ __forceinline__ void write_masked_row(const LogprobParams& p, int64_t t) {
  p.logp[t] = 0.f;
  p.lse[t] = 0.f;
  if (p.row_max != nullptr) p.row_max[t] = p.log_sum[t] = 0.f;
  if (ENT) p.entropy[t] = 0.f;
}
#endif

}  // namespace detail
}  // namespace cuda
}  // namespace vespo
