// CPU forward and backward of the per-token log-prob: each logits row is streamed from memory once
// per pass (the second read of a row in the forward hits L2), the gradient is written once, and no
// T x V temporary is ever allocated.
#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <type_traits>
#include <string>

#include "cpu_common.h"
#include "vespo/kernels.h"
#include "vespo/math.h"

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace vespo {
namespace cpu {
namespace {

constexpr int64_t kChunk = 2048;  // elements per online-softmax chunk (<= 8 KiB of fp32: stays in L1)

// Keeps the smallest bad row (1-based) seen by any thread.
void note_bad_row(std::atomic<int64_t>* bad, int64_t row1) {
  int64_t cur = bad->load();
  while ((cur == 0 || row1 < cur) && !bad->compare_exchange_weak(cur, row1)) {
  }
}

// Sums one L1-resident chunk of n elements relative to the running max mz: e^x over the elements
// with x = (z - mz) * it < 0 into the returned tail (and e^x * x into *tail2 for the entropy), and
// the number of elements with x == 0 exactly (the max term(s), each exactly 1) into *ones. Keeping the
// ones out of the float lanes is what makes the sum unbiased on confident rows: a lane that already
// holds 1 rounds away every later term below half an ulp of 1 (6e-8), and a confident row's tail is
// made of hundreds of such terms. MAXCHUNK=false is the common chunk that cannot hold a max element
// (x < 0 for all its elements): no per-element test. While the chunk is summed from L1, the next
// chunk `nxt` is prefetched, so the memory stream goes on during the arithmetic. UNIT: it == 1
// (temperature 1, the common case): the multiplication by it is skipped (x * 1 == x, bit for bit).
template <class T, int N, bool ENT, bool MAXCHUNK, bool UNIT>
VESPO_INLINE float chunk_sum(const T* zc, int64_t n, float mz, float it, const T* nxt, float* tail2,
                             int64_t* ones) {
  using W = Vec<N>;
  using vf = typename W::f;
  using vi = typename W::i;
  constexpr int64_t kStep = 2 * N, kBytes = kStep * static_cast<int64_t>(sizeof(T));
  const int64_t nv = n - n % kStep;
  const vf vit = W::splat(it), vmz = W::splat(mz), vfloor = W::splat(-100.f), vzero = W::splat(0.f);
  vf s0 = vzero, s1 = s0, e0 = s0, e1 = s0;
  vi c0 = vi{}, c1 = c0;
  const char* pf = reinterpret_cast<const char*>(nxt);
  for (int64_t v = 0; v < nv; v += kStep) {
    for (int64_t o = 0; o < kBytes; o += 64) __builtin_prefetch(pf + v * static_cast<int64_t>(sizeof(T)) + o, 0, 3);
    vf x0, x1;
    W::load_pair(zc + v, x0, x1);
    x0 -= vmz;
    x1 -= vmz;
    if (!UNIT) { x0 *= vit; x1 *= vit; }
    vf a0 = W::template exp<false>(x0), a1 = W::template exp<false>(x1);
    if (MAXCHUNK) {
      const vi one0 = x0 == vzero, one1 = x1 == vzero;  // all-ones lanes where x == 0
      c0 -= one0; c1 -= one1;
      a0 = (vf)((vi)a0 & ~one0); a1 = (vf)((vi)a1 & ~one1);
    }
    s0 += a0; s1 += a1;
    // e^x * x with x floored at -100 (where e^x is 0), so -inf logits add 0, not NaN.
    if (ENT) { e0 += a0 * W::max(x0, vfloor); e1 += a1 * W::max(x1, vfloor); }
  }
  float ts = W::sum(s0 + s1), ts2 = ENT ? W::sum(e0 + e1) : 0.f;
  int64_t cnt = 0;
  if (MAXCHUNK) for (int k = 0; k < N; ++k) cnt += c0[k] + c1[k];
  for (int64_t v = nv; v < n; ++v) {
    const float x = (load(zc, v) - mz) * it;
    if (MAXCHUNK && x == 0.f) { ++cnt; continue; }
    const float e = exp_1<false>(x);
    ts += e;
    if (ENT) ts2 += e * (x > -100.f ? x : -100.f);
  }
  *ones += cnt;
  if (ENT) *tail2 = ts2;
  return ts;
}

template <class T, int N, bool UNIT>
VESPO_INLINE void fwd_rows_t(const LogprobParams& p, int64_t r0, int64_t r1, std::atomic<int64_t>* bad) {
  using W = Vec<N>;
  using vf = typename W::f;
  const T* base = static_cast<const T*>(p.logits);
  const int64_t V = p.V;
  const float it = p.inv_temperature;
  const bool want_entropy = p.entropy != nullptr;
  for (int64_t t = r0; t < r1; ++t) {
    if (!counted(p.mask, t)) {
      p.logp[t] = 0.f;
      p.lse[t] = 0.f;
      if (p.row_max) p.row_max[t] = 0.f;
      if (p.log_sum) p.log_sum[t] = 0.f;
      if (p.entropy) p.entropy[t] = 0.f;
      continue;
    }
    const T* z = base + t * p.row_stride;
    // Online softmax over L1-sized chunks: the chunk's max, then its exp-sum from L1. With mz the
    // running max of the raw logits and x = (z - mz) * it, the sum is s = ones + tail: `ones`
    // counts the elements with x == 0 exactly (the max, each term exactly 1), `tail` is the sum
    // of the other terms (fp32 lanes within a chunk, double across chunks). When the max grows,
    // everything summed so far (ones included) is rescaled into the tail. s2 = sum e^x * x.
    float mz = -INFINITY;
    int64_t ones = 0;
    double tail = 0.0, s2 = 0.0;
    for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
      const int64_t n = V - c0 < kChunk ? V - c0 : kChunk, nv = n - n % (2 * N);
      const T* zc = z + c0;
      const T* nxt = c0 + kChunk < V ? zc + kChunk : (t + 1 < r1 ? z + p.row_stride : zc);
      vf m0 = W::splat(-INFINITY), m1 = m0;
      for (int64_t v = 0; v < nv; v += 2 * N) {
        vf a, b;
        W::load_pair(zc + v, a, b);
        m0 = W::max(m0, a);
        m1 = W::max(m1, b);
      }
      float cm = W::hmax(W::max(m0, m1));
      for (int64_t v = nv; v < n; ++v) cm = load(zc, v) > cm ? load(zc, v) : cm;
      if (cm > mz) {  // rescale what was summed relative to the old max (double: a few per row)
        const double delta = ((double)cm - (double)mz) * (double)it, scale = std::exp(-delta);
        const double s = (double)ones + tail;
        if (want_entropy) s2 = s == 0.0 ? 0.0 : scale * (s2 - delta * s);
        tail = s * scale;
        ones = 0;
        mz = cm;
      }
      if (mz == -INFINITY) continue;  // everything so far is -inf: contributes 0
      float ts2 = 0.f, ts;
      const bool maxchunk = cm == mz;
      if (want_entropy) {
        ts = maxchunk ? chunk_sum<T, N, true, true, UNIT>(zc, n, mz, it, nxt, &ts2, &ones)
                      : chunk_sum<T, N, true, false, UNIT>(zc, n, mz, it, nxt, &ts2, &ones);
      } else {
        ts = maxchunk ? chunk_sum<T, N, false, true, UNIT>(zc, n, mz, it, nxt, &ts2, &ones)
                      : chunk_sum<T, N, false, false, UNIT>(zc, n, mz, it, nxt, &ts2, &ones);
      }
      tail += ts;
      s2 += ts2;
    }
    // log s = log(ones) + log1p(tail / ones): exact for the max term(s), and log p_y of a
    // near-certain label (x_y = 0, ones = 1) is -log1p(tail), not the 0 that fp32 1 + tail gives.
    const double log_s = ones > 0 ? std::log((double)ones) + std::log1p(tail / (double)ones) : std::log(tail);
    p.lse[t] = (float)((double)mz * it + log_s);
    if (p.row_max) p.row_max[t] = mz;
    if (p.log_sum) p.log_sum[t] = (float)log_s;
    if (p.entropy) p.entropy[t] = (float)(log_s - s2 / ((double)ones + tail));
    const int64_t y = p.labels[t];
    if (y != p.ignore_index && y >= 0 && y < V) {
      const double xy = (double)((load(z, y) - mz) * it);
      p.logp[t] = (float)(xy - log_s);
    } else {
      p.logp[t] = 0.f;
      if (y != p.ignore_index) note_bad_row(bad, t + 1);
    }
  }
}

template <class T, int N>
VESPO_INLINE void fwd_rows(const LogprobParams& p, int64_t r0, int64_t r1, std::atomic<int64_t>* bad) {
  if (p.inv_temperature == 1.f) fwd_rows_t<T, N, true>(p, r0, r1, bad);
  else fwd_rows_t<T, N, false>(p, r0, r1, bad);
}

// One gradient row: g[v] = -c * p_v with p_v = exp((z_v - m) * it - ls), and the label's element
// c * (1 - p_y) written as c * sum_{v != y} p_v (exact even where p_y rounds to 1). (z - m) first:
// exact for nearby values whatever the logits' offset. The row is cut into vectors at multiples of
// N (whatever the row's alignment: the sum's order depends only on V and y), two per iteration,
// summed in element order into one vector accumulator; the vector holding y leaves y's lane out
// of the sum, and the V % N last elements are summed one by one. g may alias z (in-place gradient):
// each vector is read before it is written, and g[y] is written last.
// HW: the bf16 vector stores by the hardware conversion (store2_bf16_hw / store_bf16_hw; equal bit for
// bit). NT: the fp32 vector stores stream to memory (g aligned to the vector size; see logprob_bwd).
template <class T, int N, bool HW, bool NT>
struct BwdRow {
  using W = Vec<N>;
  using vf = typename W::f;
  const T* z;
  T* g;
  vf vit, vm, vls, vnc, acc;

  VESPO_INLINE vf prob(int64_t v) const { return W::template exp<true>((W::load(z + v) - vm) * vit - vls); }
  VESPO_INLINE void put(int64_t v, vf x) {
#if VESPO_X86_BF16
    if constexpr (HW && N == 16 && std::is_same_v<T, bf16_t>) return store_bf16_hw(g + v, x);
#endif
    if constexpr (NT) stream<N>(g + v, x);
    else W::store(g + v, x);
  }
  VESPO_INLINE void put2(int64_t v, vf a, vf b) {
#if VESPO_X86_BF16
    if constexpr (HW && N == 16 && std::is_same_v<T, bf16_t>) return store2_bf16_hw(g + v, a, b);
#endif
    put(v, a);
    put(v + N, b);
  }
  // The elements [v, e) (both multiples of N) of a range without the label. Two vectors per
  // iteration at 16 lanes (one bf16 conversion for both); one at 8, where two would run out of the
  // 16 ymm registers. The sum's order is the same either way.
  VESPO_INLINE void vectors(int64_t v, int64_t e) {
    if constexpr (N == 16) {
      for (; v + 2 * N <= e; v += 2 * N) {
        const vf p0 = prob(v), p1 = prob(v + N);
        acc += p0;
        acc += p1;
        put2(v, vnc * p0, vnc * p1);
      }
    }
    for (; v < e; v += N) {
      const vf pv = prob(v);
      acc += pv;
      put(v, vnc * pv);
    }
  }
  // The vector [v, v + N) holding the label at lane k: its stores are plain ones (see below).
  VESPO_INLINE void label_vector(int64_t v, int64_t k) {
    typename W::i lane{}, keep;
    for (int j = 0; j < N; ++j) lane[j] = j;
    keep = lane != (typename W::i{} + static_cast<int32_t>(k));
    const vf pv = prob(v);
    acc += (vf)((typename W::i)pv & keep);
    W::store(g + v, vnc * pv);
  }
};

template <class T, int N, bool HW, bool NT>
VESPO_INLINE void bwd_row(const T* z, T* g, int64_t V, int64_t y, float c, float it, float m, float ls) {
  using W = Vec<N>;
  BwdRow<T, N, HW, NT> r{z, g, W::splat(it), W::splat(m), W::splat(ls), W::splat(-c), W::splat(0.f)};
  const int64_t nv = V - V % N;  // elements in whole vectors
  if (y >= 0 && y < nv) {
    const int64_t vy = y - y % N;
    r.vectors(0, vy);
    // A plain store for the label's line, which g[y] = c * rest below writes again; with N < 16
    // (a vector smaller than a line) the line is shared with a streamed neighbour: correct either way.
    r.label_vector(vy, y - vy);
    r.vectors(vy + N, nv);
  } else {
    r.vectors(0, nv);
  }
  float sum = W::sum(r.acc);
  for (int64_t v = nv; v < V; ++v) {
    const float pv = exp_1<true>((load(z, v) - m) * it - ls);
    if (v != y) sum += pv;
    store(g, v, -c * pv);
  }
  if (y >= 0) store(g, y, c * sum);
}

// The rows [r0, r1). `nt`: stream the fp32 stores of the rows whose gradient is aligned to the
// vector size (kCanStream: fp32 at 8 or 16 lanes); the values written do not depend on it.
template <class T, int N, bool HW = false>
VESPO_INLINE void bwd_rows(const LogprobParams& p, int64_t r0, int64_t r1, bool nt) {
  const T* zbase = static_cast<const T*>(p.logits);
  T* gbase = static_cast<T*>(p.grad);
  const int64_t V = p.V;
  const float it = p.inv_temperature;
  const float scale = p.grad_scale ? *p.grad_scale : 1.f;
  const bool split = p.row_max != nullptr;  // (row_max, log_sum) given, else lse alone
  bool streamed = false;
  for (int64_t t = r0; t < r1; ++t) {
    T* g = gbase + t * p.grad_row_stride;
    const float d = counted(p.mask, t) ? p.dlogp[t] : 0.f;
    if (d == 0.f) {
      std::memset(static_cast<void*>(g), 0, sizeof(T) * static_cast<size_t>(V));
      continue;
    }
    const T* z = zbase + t * p.row_stride;
    const float c = d * scale * it;
    const float m = split ? p.row_max[t] : 0.f, ls = split ? p.log_sum[t] : p.lse[t];
    const int64_t yl = p.labels[t];
    const int64_t y = yl != p.ignore_index && yl >= 0 && yl < V ? yl : -1;  // -1: no label term
    if constexpr (kCanStream<T, N>) {
      if (nt && reinterpret_cast<uintptr_t>(g) % (sizeof(float) * N) == 0) {
        bwd_row<T, N, HW, true>(z, g, V, y, c, it, m, ls);
        streamed = true;
        continue;
      }
    }
    bwd_row<T, N, HW, false>(z, g, V, y, c, it, m, ls);
  }
#if VESPO_X86_DISPATCH
  if (streamed) _mm_sfence();  // the streamed stores are weakly ordered: complete them before the join
#else
  (void)streamed;
#endif
}

// The row loops, compiled once per instruction set.
template <class T>
void fwd_rows_generic(const LogprobParams& p, int64_t r0, int64_t r1, std::atomic<int64_t>* bad) { fwd_rows<T, 4>(p, r0, r1, bad); }
template <class T>
void bwd_rows_generic(const LogprobParams& p, int64_t r0, int64_t r1, bool nt) { bwd_rows<T, 4>(p, r0, r1, nt); }
#if VESPO_X86_DISPATCH
template <class T>
VESPO_TARGET_AVX2 __attribute__((flatten)) void fwd_rows_avx2(const LogprobParams& p, int64_t r0, int64_t r1, std::atomic<int64_t>* bad) { fwd_rows<T, 8>(p, r0, r1, bad); }
template <class T>
VESPO_TARGET_AVX2 __attribute__((flatten)) void bwd_rows_avx2(const LogprobParams& p, int64_t r0, int64_t r1, bool nt) { bwd_rows<T, 8>(p, r0, r1, nt); }
template <class T>
VESPO_TARGET_AVX512 __attribute__((flatten)) void fwd_rows_avx512(const LogprobParams& p, int64_t r0, int64_t r1, std::atomic<int64_t>* bad) { fwd_rows<T, 16>(p, r0, r1, bad); }
template <class T>
VESPO_TARGET_AVX512 __attribute__((flatten)) void bwd_rows_avx512(const LogprobParams& p, int64_t r0, int64_t r1, bool nt) { bwd_rows<T, 16>(p, r0, r1, nt); }
#endif
#if VESPO_X86_BF16
// Only the bf16 backward differs from avx512 (its store); the forward stores no bf16.
VESPO_TARGET_AVX512BF16 __attribute__((flatten)) void bwd_rows_avx512bf16(const LogprobParams& p, int64_t r0, int64_t r1, bool nt) { bwd_rows<bf16_t, 16, true>(p, r0, r1, nt); }
#endif

template <class T>
void fwd_rows_isa(Isa i, const LogprobParams& p, int64_t r0, int64_t r1, std::atomic<int64_t>* bad) {
#if VESPO_X86_DISPATCH
  if (i == Isa::kAvx512 || i == Isa::kAvx512Bf16) return fwd_rows_avx512<T>(p, r0, r1, bad);
  if (i == Isa::kAvx2) return fwd_rows_avx2<T>(p, r0, r1, bad);
#endif
  (void)i;
  fwd_rows_generic<T>(p, r0, r1, bad);
}
template <class T>
void bwd_rows_isa(Isa i, const LogprobParams& p, int64_t r0, int64_t r1, bool nt) {
#if VESPO_X86_BF16
  if constexpr (std::is_same_v<T, bf16_t>)
    if (i == Isa::kAvx512Bf16) return bwd_rows_avx512bf16(p, r0, r1, nt);
#endif
#if VESPO_X86_DISPATCH
  if (i == Isa::kAvx512 || i == Isa::kAvx512Bf16) return bwd_rows_avx512<T>(p, r0, r1, nt);
  if (i == Isa::kAvx2) return bwd_rows_avx2<T>(p, r0, r1, nt);
#endif
  (void)i;
  bwd_rows_generic<T>(p, r0, r1, nt);
}

void check_common(const LogprobParams& p, const char* fn) {
  const std::string where = std::string("vespo_ext._core.") + fn + ": ";
  if (p.T < 0) throw std::invalid_argument(where + "T must be >= 0, got " + std::to_string(p.T));
  if (p.V < 1) throw std::invalid_argument(where + "vocabulary size V must be >= 1, got " + std::to_string(p.V));
  if (p.T > 0 && p.row_stride < p.V)
    throw std::invalid_argument(where + "logits row stride " + std::to_string(p.row_stride) + " < V");
  if (p.T > 0 && (!p.logits || !p.labels || !p.lse || !p.logp))
    throw std::invalid_argument(where + "logits, labels, logp and lse are required");
  if (!(p.inv_temperature > 0.f && p.inv_temperature <= 3.4028234663852886e38f))
    throw std::invalid_argument(where + "inverse temperature must be finite and > 0");
  if ((p.row_max == nullptr) != (p.log_sum == nullptr))
    throw std::invalid_argument(where + "row_max and log_sum go together (both or neither)");
}

// Rows per chunk so that each thread gets at least ~256K elements of work.
int64_t row_grain(int64_t V) { return V >= (1 << 18) ? 1 : (1 << 18) / V; }

template <class F>
void dispatch(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: f(static_cast<float*>(nullptr)); break;
    case DType::kBFloat16: f(static_cast<bf16_t*>(nullptr)); break;
    case DType::kFloat16: f(static_cast<f16_t*>(nullptr)); break;
    default: throw std::invalid_argument("vespo_ext._core: unsupported logits dtype");
  }
}

// Ask for transparent huge pages on a large, freshly allocated gradient before it is first touched:
// on 4 KiB pages the page faults of a 268 MB buffer cost more than the kernel itself.
void advise_huge_pages(void* ptr, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = uintptr_t(2) << 20;
  if (bytes < 2 * huge) return;
  const uintptr_t b = (reinterpret_cast<uintptr_t>(ptr) + huge - 1) & ~(huge - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(ptr) + bytes) & ~(huge - 1);
  if (e > b) madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);  // advisory; errors ignored
#else
  (void)ptr; (void)bytes;
#endif
}

// The size from which the backward streams its fp32 gradient to memory (a fresh buffer, not the
// in-place one): the last-level cache (sysconf), at least 32 MiB. A smaller gradient, such as a
// fused-linear chunk that the weight-gradient GEMM reads next, stays in the cache instead.
// VESPO_CPU_STREAM_MIN_BYTES=<n> sets it (0: always), for tests and benchmarks of both store paths.
size_t stream_min_bytes() {
  static const size_t fallback = [] {
    long l3 = 0;
#if defined(_SC_LEVEL3_CACHE_SIZE)
    l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    const size_t floor = size_t(32) << 20;
    return l3 > 0 && static_cast<size_t>(l3) > floor ? static_cast<size_t>(l3) : floor;
  }();
  const char* env = std::getenv("VESPO_CPU_STREAM_MIN_BYTES");
  if (env == nullptr || *env == 0) return fallback;
  char* end = nullptr;
  const unsigned long long n = std::strtoull(env, &end, 10);
  if (*end != 0 || *env == '-')
    throw std::invalid_argument(std::string("VESPO_CPU_STREAM_MIN_BYTES must be a byte count >= 0 (or unset), got '") + env + "'");
  return static_cast<size_t>(n);
}

Isa detect_isa() {
#if VESPO_X86_DISPATCH
  __builtin_cpu_init();
#if VESPO_X86_BF16
  if (__builtin_cpu_supports("x86-64-v4") && __builtin_cpu_supports("avx512bf16")) return Isa::kAvx512Bf16;
#endif
  if (__builtin_cpu_supports("x86-64-v4")) return Isa::kAvx512;
  if (__builtin_cpu_supports("x86-64-v3")) return Isa::kAvx2;
#endif
  return Isa::kGeneric;
}

}  // namespace

const char* isa_name(Isa i) {
  return i == Isa::kAvx512Bf16 ? "avx512bf16" : i == Isa::kAvx512 ? "avx512" : i == Isa::kAvx2 ? "avx2" : "generic";
}

Isa isa() {
  static const Isa best = detect_isa();
  const char* env = std::getenv("VESPO_CPU_ISA");
  if (env == nullptr || *env == 0) return best;
  const std::string want(env);
  Isa cap;
  if (want == "avx512bf16") cap = Isa::kAvx512Bf16;
  else if (want == "avx512") cap = Isa::kAvx512;
  else if (want == "avx2") cap = Isa::kAvx2;
  else if (want == "generic") cap = Isa::kGeneric;
  else throw std::invalid_argument("VESPO_CPU_ISA must be avx512bf16, avx512, avx2 or generic (or unset), got '" + want + "'");
  return static_cast<int>(cap) < static_cast<int>(best) ? cap : best;
}

const char* active_isa() { return isa_name(isa()); }

void logprob_fwd(const LogprobParams& p) {
  check_common(p, "logprob_fwd");
  if (p.T == 0) return;
  if (!p.bad_label_row) throw std::invalid_argument("vespo_ext._core.logprob_fwd: bad_label_row is required");
  std::atomic<int64_t> bad{0};
  const Isa i = isa();
  dispatch(p.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    parallel_for(p.T, p.num_threads, row_grain(p.V), [&](int64_t b, int64_t e) { fwd_rows_isa<T>(i, p, b, e, &bad); });
  });
  if (bad.load() != 0) *p.bad_label_row = bad.load();
}

void logprob_bwd(const LogprobParams& p) {
  check_common(p, "logprob_bwd");
  if (p.T == 0) return;
  if (!p.grad || !p.dlogp) throw std::invalid_argument("vespo_ext._core.logprob_bwd: grad and dlogp are required");
  if (p.grad_row_stride < p.V) throw std::invalid_argument("vespo_ext._core.logprob_bwd: grad row stride < V");
  const size_t elem = p.dtype == DType::kFloat32 ? 4 : 2;
  if (p.grad != p.logits)
    advise_huge_pages(p.grad, static_cast<size_t>((p.T - 1) * p.grad_row_stride + p.V) * elem);
  const Isa i = isa();
  const size_t bytes = static_cast<size_t>(p.T) * static_cast<size_t>(p.V) * elem;
  const bool nt = p.grad != p.logits && bytes >= stream_min_bytes();
  dispatch(p.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    parallel_for(p.T, p.num_threads, row_grain(p.V), [&](int64_t b, int64_t e) { bwd_rows_isa<T>(i, p, b, e, nt); });
  });
}

}  // namespace cpu
}  // namespace vespo
