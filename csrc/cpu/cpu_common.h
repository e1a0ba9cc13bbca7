// Small CPU building blocks: a deterministic parallel-for over std::thread, a vectorisable exp,
// element loads/stores for fp32/bf16/fp16, and the per-instruction-set code paths (AVX-512 [+BF16], AVX2, baseline).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// One build runs everywhere: the hot loops are compiled three times (x86-64-v4 = AVX-512,
// x86-64-v3 = AVX2/FMA/F16C, and the baseline) and `isa()` picks one at run time.
#define VESPO_X86_DISPATCH 1
#define VESPO_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define VESPO_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#include <immintrin.h>
#else
#define VESPO_X86_DISPATCH 0
#endif
// A fourth path, AVX-512 plus AVX512_BF16 (vcvtneps2bf16 for the bf16 gradient store), where
// CMakeLists.txt found that the compiler and assembler take it (VESPO_HAVE_AVX512BF16=1).
#if VESPO_X86_DISPATCH && defined(VESPO_HAVE_AVX512BF16) && VESPO_HAVE_AVX512BF16
#define VESPO_X86_BF16 1
#define VESPO_TARGET_AVX512BF16 __attribute__((target("arch=x86-64-v4,avx512bf16")))
#else
#define VESPO_X86_BF16 0
#endif
// Small helpers are always inlined, so that they take the instruction set of the loop they are in.
#define VESPO_INLINE __attribute__((always_inline)) inline

namespace vespo {
namespace cpu {

// The instruction set of the CPU kernels' hot loops: the best this CPU supports (checked once),
// capped by the environment variable VESPO_CPU_ISA=avx512bf16|avx512|avx2|generic (for tests and
// benchmarks of the other code paths on one machine). An unknown value throws std::invalid_argument.
// avx512bf16 is avx512 with the hardware fp32 -> bf16 conversion; its outputs equal avx512's bitwise.
enum class Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
Isa isa();
const char* isa_name(Isa i);

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

VESPO_INLINE float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
VESPO_INLINE uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

struct bf16_t { uint16_t bits; };

static VESPO_INLINE float load(const float* p, int64_t i) { return p[i]; }
static VESPO_INLINE float load(const bf16_t* p, int64_t i) { return bits_to_float((uint32_t)p[i].bits << 16); }
static VESPO_INLINE void store(float* p, int64_t i, float v) { p[i] = v; }
static VESPO_INLINE void store(bf16_t* p, int64_t i, float v) {
  const uint32_t u = float_to_bits(v);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  p[i].bits = (uint16_t)(v != v ? 0x7FC0u : rounded);
}

#if defined(__FLT16_MAX__)
using f16_t = _Float16;
static VESPO_INLINE float load(const f16_t* p, int64_t i) { return (float)p[i]; }
static VESPO_INLINE void store(f16_t* p, int64_t i, float v) { p[i] = (f16_t)v; }
#else
struct f16_t { uint16_t bits; };
static VESPO_INLINE float load(const f16_t* p, int64_t i) {
  const uint32_t h = p[i].bits, sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  if (exp == 0) return (sign ? -1.f : 1.f) * std::ldexp((float)man, -24);
  if (exp == 31) return bits_to_float(sign | 0x7F800000u | (man << 13));
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}
static VESPO_INLINE void store(f16_t* p, int64_t i, float v) {
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

// ---- The exponential of the hot loops (scalar here, lane-wise in Vec<N>::exp).
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693145751953125f;          // ln 2 in 15 bits: n * kLn2Hi is exact for |n| < 2^9
constexpr float kLn2Lo = 1.428606765330187045e-06f;   // ln 2 - kLn2Hi
constexpr float kExpLo = -88.02969193111305f;         // -127 ln 2: rounds to n = -127, whose 2^n bits are 0
constexpr float kExpHi = 88.02969193111305f;          // 127 ln 2
constexpr float kExpMagic = 12582912.0f;              // 1.5 * 2^23: adding it rounds to an integer in the mantissa

// e^(x - n ln 2) for t = x log2 e + kExpMagic (so n = t - kExpMagic), for a float or a vector of
// floats: the same operations either way, so a row's scalar tail and its vector lanes agree.
template <class F>
static VESPO_INLINE F exp_reduced(F x, F t) {
  const F n = t - kExpMagic;
  F r = x - n * kLn2Hi;  // exact: n * kLn2Hi has <= 24 bits, and x is close to it
  r = r - n * kLn2Lo;
  F q = r * (1.0f / 720.0f) + 1.0f / 120.0f;
  q = q * r + 1.0f / 24.0f;
  q = q * r + 1.0f / 6.0f;
  q = q * r + 0.5f;
  q = q * r + 1.0f;
  q = q * r + 1.0f;
  return q;
}

// e^x for the kernels' hot loops: x = n ln2 + r with n = round(x log2 e), r by the two-part ln 2
// (Cody-Waite: exact with or without FMA, so no path's rounding is biased), e^r by its degree-6
// Taylor polynomial on |r| <= ln2/2 (max rel. error 1.2e-7, odd in r: it averages out over a row),
// times 2^n built in the exponent field (bits(t) = bits(magic) + n). x <= -127 ln 2 (incl. -inf)
// gives exactly 0, NaN propagates; HI clamps x > 127 ln 2 (needed only where x can be positive).
// Vec<N>::exp is the same, lane-wise (at 16 lanes with vscalefps for 2^n: exp_avx512 below).
template <bool HI>
static VESPO_INLINE float exp_1(float x) {
  x = x < kExpLo ? kExpLo : x;
  if (HI) x = x > kExpHi ? kExpHi : x;
  const float t = x * kLog2e + kExpMagic;
  return exp_reduced(x, t) * bits_to_float((float_to_bits(t) + 127u) << 23);
}

// ---- Explicit vectors of N floats (GCC/Clang vector extensions), N = 16 in the AVX-512 loops
// (one zmm), 8 in the AVX2 loops (one ymm), 4 in the baseline (SSE2/NEON). Wider-than-native
// vectors are not used: GCC lowers some of their operations lane by lane. Auto-vectorisation of
// the exp loops proved unreliable, so the hot loops are written with these.
template <int N>
struct VecTypes;
#if defined(__FLT16_MAX__)
#define VESPO_VEC_HALF(N) typedef _Float16 hf __attribute__((vector_size(2 * N)));
#else
#define VESPO_VEC_HALF(N)
#endif
#define VESPO_VEC_TYPES(N)                                          \
  template <>                                                       \
  struct VecTypes<N> {                                              \
    typedef float f __attribute__((vector_size(4 * N)));            \
    typedef int32_t i __attribute__((vector_size(4 * N)));          \
    typedef uint32_t u __attribute__((vector_size(4 * N)));         \
    typedef uint16_t h __attribute__((vector_size(2 * N)));         \
    VESPO_VEC_HALF(N)                                               \
  };
VESPO_VEC_TYPES(4)
VESPO_VEC_TYPES(8)
VESPO_VEC_TYPES(16)
#undef VESPO_VEC_TYPES
#undef VESPO_VEC_HALF

#if VESPO_X86_DISPATCH
// Vec<16>::exp and Vec<16>::load(bf16) in AVX-512 form (defined below). Not always_inline: GCC
// refuses intrinsics in untargeted always_inline templates; the AVX-512 row loops are `flatten`ed,
// which inlines them.
template <bool HI>
VESPO_TARGET_AVX512 inline VecTypes<16>::f exp_avx512(VecTypes<16>::f x);
VESPO_TARGET_AVX512 inline VecTypes<16>::f load_bf16_avx512(const bf16_t* p);
// x < b ? b : x (UPPER = false) or x > b ? b : x (UPPER = true), a NaN x kept: vmaxps(b, x) / vminps(b, x)
// return their second operand when either is NaN. GCC compiles the ternaries to a compare and a
// blend (vblendvps: two micro-ops on Intel), and the AVX2 loops are short of registers.
template <bool UPPER>
VESPO_TARGET_AVX2 inline VecTypes<8>::f clamp_avx2(VecTypes<8>::f x, float b) {
  return (VecTypes<8>::f)(UPPER ? _mm256_min_ps(_mm256_set1_ps(b), (__m256)x) : _mm256_max_ps(_mm256_set1_ps(b), (__m256)x));
}
#endif

template <int N>
struct Vec {
  typedef typename VecTypes<N>::f f;
  typedef typename VecTypes<N>::i i;
  typedef typename VecTypes<N>::u u;
  typedef typename VecTypes<N>::h h;

  static VESPO_INLINE f splat(float x) { return f{} + x; }
  static VESPO_INLINE f load(const float* p) { f r; std::memcpy(&r, p, sizeof r); return r; }
  static VESPO_INLINE f load(const bf16_t* p) {
#if VESPO_X86_DISPATCH
    if constexpr (N == 16) return load_bf16_avx512(p);  // GCC lowers the generic form by halves: 6 instructions
#endif
    h x;
    std::memcpy(&x, p, sizeof x);
    return (f)(__builtin_convertvector(x, u) << 16);
  }
  static VESPO_INLINE void store(float* p, f v) { std::memcpy(p, &v, sizeof v); }
  static VESPO_INLINE void store(bf16_t* p, f v) {
    const u b = (u)v;
    u r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
    r = (v != v) ? u{} + 0x7FC0u : r;
    const h x = __builtin_convertvector(r, h);
    std::memcpy(p, &x, sizeof x);
  }
#if defined(__FLT16_MAX__)
  typedef typename VecTypes<N>::hf hf;
  static VESPO_INLINE f load(const f16_t* p) { hf x; std::memcpy(&x, p, sizeof x); return __builtin_convertvector(x, f); }
  static VESPO_INLINE void store(f16_t* p, f v) { const hf x = __builtin_convertvector(v, hf); std::memcpy(p, &x, sizeof x); }
#else
  static VESPO_INLINE f load(const f16_t* p) { f r; for (int k = 0; k < N; ++k) r[k] = cpu::load(p, k); return r; }
  static VESPO_INLINE void store(f16_t* p, f v) { for (int k = 0; k < N; ++k) cpu::store(p, k, v[k]); }
#endif
  static VESPO_INLINE f max(f a, f b) { return a > b ? a : b; }
  // Two vectors from the 2N contiguous elements at p, for the forward's order-free uses (the max,
  // the exp-sum): contiguous halves, except bf16 at 16 lanes, where the elements are interleaved
  // with zeros in each 128-bit lane (vpunpcklwd/vpunpckhwd: the fp32 bits without a shift).
  template <class T>
  static VESPO_INLINE void load_pair(const T* p, f& a, f& b) { a = load(p); b = load(p + N); }
  static VESPO_INLINE void load_pair(const bf16_t* p, f& a, f& b) {
    if constexpr (N == 16) {
      typedef uint16_t h32 __attribute__((vector_size(64)));
      h32 x;
      std::memcpy(&x, p, sizeof x);
      const h32 z = {};
      a = (f)__builtin_shufflevector(z, x, 0, 32, 1, 33, 2, 34, 3, 35, 8, 40, 9, 41, 10, 42, 11, 43, 16, 48, 17, 49, 18, 50, 19, 51, 24, 56, 25, 57, 26, 58, 27, 59);
      b = (f)__builtin_shufflevector(z, x, 4, 36, 5, 37, 6, 38, 7, 39, 12, 44, 13, 45, 14, 46, 15, 47, 20, 52, 21, 53, 22, 54, 23, 55, 28, 60, 29, 61, 30, 62, 31, 63);
    } else {
      a = load(p);
      b = load(p + N);
    }
  }

  // e^x lane-wise (see exp_1 above for the method and its error).
  template <bool HI>
  static VESPO_INLINE f exp(f x) {
#if VESPO_X86_DISPATCH
    if constexpr (N == 16) return exp_avx512<HI>(x);
#endif
#if VESPO_X86_DISPATCH
    if constexpr (N == 8) {  // the same clamps as below in one instruction each (see clamp_avx2)
      x = clamp_avx2<false>(x, kExpLo);
      if (HI) x = clamp_avx2<true>(x, kExpHi);
    } else
#endif
    {
      x = x < kExpLo ? splat(kExpLo) : x;  // NaN < lo is false: NaN stays
      if (HI) x = x > kExpHi ? splat(kExpHi) : x;
    }
    const f t = x * kLog2e + kExpMagic;
    return exp_reduced(x, t) * (f)(((u)t + 127u) << 23);
  }
  static VESPO_INLINE float sum(f v) {
    float s = 0.f;
    for (int k = 0; k < N; ++k) s += v[k];
    return s;
  }
  static VESPO_INLINE float hmax(f v) {
    float m = v[0];
    for (int k = 1; k < N; ++k) m = v[k] > m ? v[k] : m;
    return m;
  }
};

#if VESPO_X86_DISPATCH
// Vec<16>::exp by AVX-512 instructions: the range reduction and polynomial of exp_reduced,
// then 2^n applied by vscalefps (exact, as the multiplication by the built 2^n bits is, but for a
// subnormal product), zero-masked where n <= -127 (the lanes the generic form clamps to 0:
// x <= -127 ln 2, -inf included); NaN compares unordered and propagates. No clamp, shift or add.
template <bool HI>
VESPO_TARGET_AVX512 inline VecTypes<16>::f exp_avx512(VecTypes<16>::f x) {
  using f = VecTypes<16>::f;
  // vminps(hi, x) returns its second operand x when either is NaN: the clamp x > hi ? hi : x in one
  // instruction (GCC does not form it from the ternary). The full-mask maskz form, since GCC 12's
  // _mm512_min_ps warns (-Wmaybe-uninitialized, a false positive on its _mm512_undefined_ps).
  if (HI) x = (f)_mm512_maskz_min_ps((__mmask16)0xFFFF, _mm512_set1_ps(kExpHi), (__m512)x);
  const f t = x * kLog2e + kExpMagic;
  const f q = exp_reduced(x, t), n = t - kExpMagic;
  const __mmask16 keep = _mm512_cmp_ps_mask((__m512)n, _mm512_set1_ps(-127.f), _CMP_NLE_UQ);
  return (f)_mm512_maskz_scalef_ps(keep, (__m512)q, (__m512)n);
}

// 16 bf16 -> fp32: vpmovzxwd + vpslld (the generic vector-extension form compiles to 6 instructions).
// The full-mask maskz form, as in exp_avx512.
VESPO_TARGET_AVX512 inline VecTypes<16>::f load_bf16_avx512(const bf16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return (VecTypes<16>::f)((VecTypes<16>::u)_mm512_maskz_cvtepu16_epi32((__mmask16)0xFFFF, h) << 16);
}
#endif

#if VESPO_X86_DISPATCH
// Non-temporal (streaming) fp32 vector stores, p aligned to the vector's size: a large output that
// will not be read again soon goes to memory without first reading each line in (the read-for-
// ownership that doubles a plain store's traffic). Called from `flatten`ed loops, as exp_avx512.
VESPO_TARGET_AVX512 inline void stream_avx512(float* p, VecTypes<16>::f v) { _mm512_stream_ps(p, (__m512)v); }
VESPO_TARGET_AVX2 inline void stream_avx2(float* p, VecTypes<8>::f v) { _mm256_stream_ps(p, (__m256)v); }
#endif
// Streaming stores are implemented for fp32 vectors of 8 and 16 lanes on x86 (elsewhere: none);
// stream<N> is only instantiated where kCanStream holds.
template <class T, int N>
constexpr bool kCanStream = VESPO_X86_DISPATCH && std::is_same_v<T, float> && (N == 8 || N == 16);
template <int N>
VESPO_INLINE void stream(float* p, typename VecTypes<N>::f v) {
  static_assert(kCanStream<float, N>, "streaming stores exist for fp32 at 8 or 16 lanes on x86 only");
#if VESPO_X86_DISPATCH
  if constexpr (N == 16) stream_avx512(p, v);
  else stream_avx2(p, v);
#endif
}

#if VESPO_X86_BF16
// Vec<16>::store(bf16_t*) by vcvtneps2bf16: the same round-to-nearest-even on normal numbers,
// zeros and infinities, but the instruction flushes fp32 subnormals to a signed zero and keeps a
// NaN's sign and payload, where the software store rounds subnormals and writes one quiet NaN.
// Vectors holding either (vfpclassps: QNaN 0x01, subnormal 0x20, SNaN 0x80) take the software
// store, so the result equals it bit for bit on every input. Not always_inline: GCC refuses that
// into the (untargeted) templates; the flatten attribute of the avx512bf16 loop inlines it there.
VESPO_TARGET_AVX512BF16 inline void store_bf16_hw(bf16_t* p, Vec<16>::f v) {
  const __m512 x = (__m512)v;
  if (__builtin_expect(_mm512_fpclass_ps_mask(x, 0xA1) != 0, 0)) return Vec<16>::store(p, v);
  const __m256i h = (__m256i)_mm512_cvtneps_pbh(x);
  std::memcpy(p, &h, sizeof h);
}
// Two vectors (32 contiguous elements, a first) by one vcvtne2ps2bf16 and one check for both.
VESPO_TARGET_AVX512BF16 inline void store2_bf16_hw(bf16_t* p, Vec<16>::f a, Vec<16>::f b) {
  const __m512 xa = (__m512)a, xb = (__m512)b;
  if (__builtin_expect((_mm512_fpclass_ps_mask(xa, 0xA1) | _mm512_fpclass_ps_mask(xb, 0xA1)) != 0, 0)) {
    Vec<16>::store(p, a);
    return Vec<16>::store(p + 16, b);
  }
  const __m512i h = (__m512i)_mm512_cvtne2ps_pbh(xb, xa);  // low 16 words from xa, high 16 from xb
  std::memcpy(p, &h, sizeof h);
}
#endif

}  // namespace cpu
}  // namespace vespo
