// Small CPU building blocks: a deterministic parallel-for over std::thread, a vectorisable exp,
// element loads/stores for fp32/bf16/fp16, and x86-64-v3 function multiversioning.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// One build runs everywhere; AVX2/FMA/F16C machines take the x86-64-v3 clone at load time.
#define VESPO_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define VESPO_MULTIVERSION
#endif

namespace vespo {
namespace cpu {

// Static contiguous partition of [0, n) into at most `threads` chunks of at least `grain` items;
// chunk 0 runs on the calling thread. The partition depends only on (n, threads, grain), so results
// are reproducible for a given thread count.
template <class F>
void parallel_for(int64_t n, int threads, int64_t grain, F&& fn) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  int64_t chunks = (n + grain - 1) / grain;
  if (threads < 1) threads = 1;
  if (chunks > threads) chunks = threads;
  if (chunks <= 1) {
    fn(int64_t(0), n);
    return;
  }
  const int64_t per = (n + chunks - 1) / chunks;
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(chunks - 1));
  for (int64_t c = 1; c < chunks; ++c) {
    const int64_t b = c * per, e = b + per < n ? b + per : n;
    if (b >= e) break;
    pool.emplace_back([&fn, b, e] { fn(b, e); });
  }
  fn(int64_t(0), per < n ? per : n);
  for (auto& th : pool) th.join();
}

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// exp(x) for float, vectorisable under `omp simd`: range reduction by ln2 and a degree-6 polynomial
// (max rel. error ~2 ulp on the full range). Returns 0 for x < -87.3 (incl. -inf); x > 88.3 is clamped
// to exp(88.3); NaN propagates.
static inline float fast_expf(float x) {
  const float lo = -87.3f, hi = 88.3f;
  const float xc = x > hi ? hi : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the mantissa
  const float t = xc * 1.44269504088896341f + magic;
  const float n = t - magic;
  const int32_t ni = (int32_t)(float_to_bits(t) - float_to_bits(magic));
  float r = xc - n * 0.693145751953125f;  // ln2 split in two for an exact product
  r = r - n * 1.428606765330187045e-06f;
  // exp(r) on |r| <= ln2/2
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float scale = bits_to_float((uint32_t)((ni + 127) << 23));
  const float y = p * scale;
  return x < lo ? 0.0f : y;
}

struct bf16_t { uint16_t bits; };

static inline float load(const float* p, int64_t i) { return p[i]; }
static inline float load(const bf16_t* p, int64_t i) { return bits_to_float((uint32_t)p[i].bits << 16); }
static inline void store(float* p, int64_t i, float v) { p[i] = v; }
static inline void store(bf16_t* p, int64_t i, float v) {
  const uint32_t u = float_to_bits(v);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  p[i].bits = (uint16_t)(v != v ? 0x7FC0u : rounded);
}

#if defined(__FLT16_MAX__)
using f16_t = _Float16;
static inline float load(const f16_t* p, int64_t i) { return (float)p[i]; }
static inline void store(f16_t* p, int64_t i, float v) { p[i] = (f16_t)v; }
#else
struct f16_t { uint16_t bits; };
static inline float load(const f16_t* p, int64_t i) {
  const uint32_t h = p[i].bits, sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  if (exp == 0) return (sign ? -1.f : 1.f) * std::ldexp((float)man, -24);
  if (exp == 31) return bits_to_float(sign | 0x7F800000u | (man << 13));
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}
static inline void store(f16_t* p, int64_t i, float v) {
  // Round to nearest even through a float trick; handles overflow to inf and subnormals.
  const uint32_t u = float_to_bits(v), sign = (u >> 16) & 0x8000u;
  const float a = std::fabs(v);
  uint16_t h;
  if (v != v) h = 0x7E00u;
  else if (a >= 65520.f) h = (uint16_t)(sign | 0x7C00u);
  else if (a < 6.103515625e-05f) h = (uint16_t)(sign | (uint32_t)std::nearbyint(a * 16777216.f));
  else {
    const uint32_t au = float_to_bits(a);
    const uint32_t r = au + 0xFFFu + ((au >> 13) & 1u);
    h = (uint16_t)(sign | ((r - (112u << 23)) >> 13));
  }
  p[i].bits = h;
}
#endif

// ---- Explicit 8-wide vectors (GCC/Clang vector extensions): the compiler lowers them to AVX2 in
// the x86-64-v3 clone, to SSE/NEON pairs elsewhere. Auto-vectorisation of the exp loops proved
// unreliable across clones, so the hot loops are written with these.
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8us __attribute__((vector_size(16)));
constexpr int64_t kVec = 8;

static inline v8f vsplat(float x) { return v8f{x, x, x, x, x, x, x, x}; }
static inline v8f vload(const float* p) { v8f r; std::memcpy(&r, p, sizeof r); return r; }
static inline v8f vload(const bf16_t* p) {
  v8us h;
  std::memcpy(&h, p, sizeof h);
  return (v8f)(__builtin_convertvector(h, v8u) << 16);
}
static inline void vstore(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }
static inline void vstore(bf16_t* p, v8f v) {
  const v8u u = (v8u)v;
  v8u r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  r = (v != v) ? v8u{} + 0x7FC0u : r;
  const v8us h = __builtin_convertvector(r, v8us);
  std::memcpy(p, &h, sizeof h);
}
#if defined(__FLT16_MAX__)
typedef _Float16 v8h __attribute__((vector_size(16)));
static inline v8f vload(const f16_t* p) { v8h h; std::memcpy(&h, p, sizeof h); return __builtin_convertvector(h, v8f); }
static inline void vstore(f16_t* p, v8f v) { const v8h h = __builtin_convertvector(v, v8h); std::memcpy(p, &h, sizeof h); }
#else
static inline v8f vload(const f16_t* p) { v8f r; for (int i = 0; i < 8; ++i) r[i] = load(p, i); return r; }
static inline void vstore(f16_t* p, v8f v) { for (int i = 0; i < 8; ++i) store(p, i, v[i]); }
#endif

static inline v8f vmax(v8f a, v8f b) { return a > b ? a : b; }

// fast_expf, lane-wise (identical operations).
static inline v8f vexp(v8f x) {
  const v8f hi = vsplat(88.3f), magic = vsplat(12582912.0f);
  const v8f xc = x > hi ? hi : x;
  const v8f t = xc * 1.44269504088896341f + magic;
  const v8f n = t - magic;
  const v8i ni = (v8i)((v8u)t - (v8u)magic);
  v8f r = xc - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  v8f p = vsplat(1.0f / 720.0f);
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const v8f scale = (v8f)((ni + 127) << 23);
  const v8f y = p * scale;
  return x < -87.3f ? vsplat(0.f) : y;
}

static inline float hsum(v8f v) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += v[i];
  return s;
}
static inline float hmax(v8f v) {
  float m = v[0];
  for (int i = 1; i < 8; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

}  // namespace cpu
}  // namespace vespo
