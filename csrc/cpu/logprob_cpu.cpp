// CPU forward and backward of the per-token log-prob: each logits row is streamed from memory once
// per pass (the second read of a row in the forward hits L2), the gradient is written once, and no
// T x V temporary is ever allocated.
#include <atomic>
#include <stdexcept>
#include <type_traits>
#include <string>

#include "cpu_common.h"
#include "vespo/kernels.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace vespo {
namespace cpu {
namespace {

inline bool counted(const uint8_t* mask, int64_t t) { return mask == nullptr || mask[t] != 0; }

constexpr int64_t kChunk = 2048;  // elements per online-softmax chunk (<= 8 KiB of fp32: stays in L1)

// Keeps the smallest bad row (1-based) seen by any thread.
void note_bad_row(std::atomic<int64_t>* bad, int64_t row1) {
  int64_t cur = bad->load();
  while ((cur == 0 || row1 < cur) && !bad->compare_exchange_weak(cur, row1)) {
  }
}

template <class T>
VESPO_MULTIVERSION void fwd_rows(const LogprobParams& p, int64_t r0, int64_t r1, std::atomic<int64_t>* bad) {
  const T* base = static_cast<const T*>(p.logits);
  const int64_t V = p.V;
  const float it = p.inv_temperature;
  for (int64_t t = r0; t < r1; ++t) {
    if (!counted(p.mask, t)) {
      p.logp[t] = 0.f;
      p.lse[t] = 0.f;
      if (p.entropy) p.entropy[t] = 0.f;
      continue;
    }
    const T* z = base + t * p.row_stride;
    // Online softmax over L1-sized chunks: the chunk's max, then its exp-sum from L1, rescaling the
    // running sums when the max grows. x = (z - mz) * it with mz the running max of the raw logits:
    // the max element gives x = 0 exactly, so s >= 1 and log p = x_y - log s <= 0 always (and is
    // exactly 0 for V = 1). s = sum e^x, s2 = sum e^x * x (entropy).
    float mz = -INFINITY, s = 0.f, s2 = 0.f;
    const bool want_entropy = p.entropy != nullptr;
    for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
      const int64_t n = V - c0 < kChunk ? V - c0 : kChunk, nv = n - n % (2 * kVec);
      const T* zc = z + c0;
      v8f m0 = vsplat(-INFINITY), m1 = m0;
      for (int64_t v = 0; v < nv; v += 2 * kVec) {
        m0 = vmax(m0, vload(zc + v));
        m1 = vmax(m1, vload(zc + v + kVec));
      }
      float cm = hmax(vmax(m0, m1));
      for (int64_t v = nv; v < n; ++v) cm = load(zc, v) > cm ? load(zc, v) : cm;
      if (cm > mz) {  // rescale what was summed relative to the old max
        const float delta = (cm - mz) * it, scale = fast_expf(-delta);
        if (want_entropy) s2 = s == 0.f ? 0.f : scale * (s2 - delta * s);
        s *= scale;
        mz = cm;
      }
      if (mz == -INFINITY) continue;  // everything so far is -inf: contributes 0
      const v8f vit = vsplat(it), vmz = vsplat(mz), vfloor = vsplat(-100.f);
      v8f s0 = vsplat(0.f), s1 = s0, e0 = s0, e1 = s0;
      if (want_entropy) {
        for (int64_t v = 0; v < nv; v += 2 * kVec) {
          const v8f x0 = (vload(zc + v) - vmz) * vit, x1 = (vload(zc + v + kVec) - vmz) * vit;
          const v8f a0 = vexp(x0), a1 = vexp(x1);
          s0 += a0; s1 += a1;
          // e^x * x with x floored at -100 (where e^x is 0), so -inf logits add 0, not NaN.
          e0 += a0 * vmax(x0, vfloor); e1 += a1 * vmax(x1, vfloor);
        }
        float ts = hsum(s0 + s1), ts2 = hsum(e0 + e1);
        for (int64_t v = nv; v < n; ++v) {
          const float x = (load(zc, v) - mz) * it, e = fast_expf(x);
          ts += e;
          ts2 += e * (x > -100.f ? x : -100.f);
        }
        s += ts;
        s2 += ts2;
      } else {
        for (int64_t v = 0; v < nv; v += 2 * kVec) {
          s0 += vexp((vload(zc + v) - vmz) * vit);
          s1 += vexp((vload(zc + v + kVec) - vmz) * vit);
        }
        float ts = hsum(s0 + s1);
        for (int64_t v = nv; v < n; ++v) ts += fast_expf((load(zc, v) - mz) * it);
        s += ts;
      }
    }
    const float log_s = std::log(s);
    p.lse[t] = mz * it + log_s;
    if (p.entropy) p.entropy[t] = log_s - s2 / s;
    const int64_t y = p.labels[t];
    if (y != p.ignore_index && y >= 0 && y < V) {
      p.logp[t] = (load(z, y) - mz) * it - log_s;
    } else {
      p.logp[t] = 0.f;
      if (y != p.ignore_index) note_bad_row(bad, t + 1);
    }
  }
}

// Writes g[v] = -c * p_v for v in [b, e) and returns sum of p_v over the range.
template <class T>
__attribute__((always_inline)) inline float bwd_range(const T* z, T* g, int64_t b, int64_t e, float c, float it,
                                                   float lse) {
  const v8f vit = vsplat(it), vlse = vsplat(lse), vnc = vsplat(-c);
  v8f acc = vsplat(0.f);
  int64_t v = b;
  for (; v + kVec <= e; v += kVec) {
    const v8f pv = vexp(vload(z + v) * vit - vlse);
    acc += pv;
    vstore(g + v, vnc * pv);
  }
  float sum = hsum(acc);
  for (; v < e; ++v) {
    const float pv = fast_expf(load(z, v) * it - lse);
    sum += pv;
    store(g, v, -c * pv);
  }
  return sum;
}

template <class T>
VESPO_MULTIVERSION void bwd_rows(const LogprobParams& p, int64_t r0, int64_t r1) {
  const T* zbase = static_cast<const T*>(p.logits);
  T* gbase = static_cast<T*>(p.grad);
  const int64_t V = p.V;
  const float it = p.inv_temperature;
  const float scale = p.grad_scale ? *p.grad_scale : 1.f;
  for (int64_t t = r0; t < r1; ++t) {
    T* g = gbase + t * p.grad_row_stride;
    const float d = counted(p.mask, t) ? p.dlogp[t] : 0.f;
    if (d == 0.f) {
      std::memset(static_cast<void*>(g), 0, sizeof(T) * static_cast<size_t>(V));
      continue;
    }
    // g may alias z (in-place gradient): every element is read before it is written, and the
    // label's own logit is never read (its term is the sum of the other probabilities).
    const T* z = zbase + t * p.row_stride;
    const float c = d * scale * it;
    const float lse = p.lse[t];
    const int64_t y = p.labels[t];
    if (y != p.ignore_index && y >= 0 && y < V) {
      // The label's term c * (1 - p_y) as c * sum_{v != y} p_v: exact even when p_y rounds to 1.
      const float rest = bwd_range(z, g, 0, y, c, it, lse) + bwd_range(z, g, y + 1, V, c, it, lse);
      store(g, y, c * rest);
    } else {
      bwd_range(z, g, 0, V, c, it, lse);
    }
  }
}

void check_common(const LogprobParams& p, const char* fn) {
  const std::string where = std::string("vespo_ext._core.") + fn + ": ";
  if (p.T < 0) throw std::invalid_argument(where + "T must be >= 0, got " + std::to_string(p.T));
  if (p.V < 1) throw std::invalid_argument(where + "vocabulary size V must be >= 1, got " + std::to_string(p.V));
  if (p.T > 0 && p.row_stride < p.V)
    throw std::invalid_argument(where + "logits row stride " + std::to_string(p.row_stride) + " < V");
  if (p.T > 0 && (!p.logits || !p.labels || !p.lse || !p.logp))
    throw std::invalid_argument(where + "logits, labels, logp and lse are required");
  if (!(p.inv_temperature > 0.f))
    throw std::invalid_argument(where + "inverse temperature must be > 0");
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

}  // namespace

void logprob_fwd(const LogprobParams& p) {
  check_common(p, "logprob_fwd");
  if (p.T == 0) return;
  if (!p.bad_label_row) throw std::invalid_argument("vespo_ext._core.logprob_fwd: bad_label_row is required");
  std::atomic<int64_t> bad{0};
  dispatch(p.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    parallel_for(p.T, p.num_threads, row_grain(p.V), [&](int64_t b, int64_t e) { fwd_rows<T>(p, b, e, &bad); });
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
  dispatch(p.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    parallel_for(p.T, p.num_threads, row_grain(p.V), [&](int64_t b, int64_t e) { bwd_rows<T>(p, b, e); });
  });
}

}  // namespace cpu
}  // namespace vespo
