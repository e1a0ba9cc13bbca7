// Host replay of the CUDA forward's summation (csrc/cuda/softmax_state.cuh, compiled by nvcc as host
// code: the same fold/merge the kernel inlines) on confident rows at V = 151936: one block's exact
// order (each thread's 4-vector batches, then single vectors; the warp shfl-down tree; thread 0
// folding the warps in order), for the block size and vector width the kernel picks for the dtype.
// Also replays the pre-#18 scheme (one running sum holding the max term) to show the harness sees
// that bias. Prints "bias <dtype> <scheme> <mean signed err> <mean |err|> <max |err|> <p_min> <p_max>";
// tests/test_cuda_host_math.py checks the numbers against the float64 log-probs.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "../../csrc/cuda/softmax_state.cuh"

using namespace vespo::cuda::detail;

namespace {

constexpr int V = 151936, BLOCK = 512, UNROLL = 4, ROWS = 192;

// The pre-#18 state: the max term summed into s like any other.
struct OldState { float zmax, s; };
template <int N>
void old_fold(OldState& st, const float (&z)[N], Scale2 c2) {
  float zm = z[0];
  for (int j = 1; j < N; ++j) zm = fmaxf(zm, z[j]);
  if (zm > st.zmax) {
    st.s *= exp2_poly(scale2(ref_of(st.zmax) - ref_of(zm), c2));
    st.zmax = zm;
  }
  const float ref = ref_of(st.zmax);
  for (int j = 0; j < N; ++j) st.s += exp2_poly(scale2(z[j] - ref, c2));
}
void old_merge(OldState& a, OldState b, Scale2 c2) {
  const float M = fmaxf(a.zmax, b.zmax), RM = ref_of(M);
  a.s = a.s * exp2_poly(scale2(ref_of(a.zmax) - RM, c2)) + b.s * exp2_poly(scale2(ref_of(b.zmax) - RM, c2));
  a.zmax = M;
}
void fold_any(SmState& st, const float* z, int n, Scale2 c2) {
  if (n == 16) { float a[16]; std::memcpy(a, z, sizeof a); fold<16, false>(st, a, c2); }
  else if (n == 32) { float a[32]; std::memcpy(a, z, sizeof a); fold<32, false>(st, a, c2); }
  else if (n == 4) { float a[4]; std::memcpy(a, z, sizeof a); fold<4, false>(st, a, c2); }
  else if (n == 8) { float a[8]; std::memcpy(a, z, sizeof a); fold<8, false>(st, a, c2); }
  else { float a[1] = {z[0]}; fold<1, false>(st, a, c2); }  // (V = 151936: no scalar tail)
}
void fold_any(OldState& st, const float* z, int n, Scale2 c2) {
  if (n == 16) { float a[16]; std::memcpy(a, z, sizeof a); old_fold<16>(st, a, c2); }
  else if (n == 32) { float a[32]; std::memcpy(a, z, sizeof a); old_fold<32>(st, a, c2); }
  else if (n == 4) { float a[4]; std::memcpy(a, z, sizeof a); old_fold<4>(st, a, c2); }
  else if (n == 8) { float a[8]; std::memcpy(a, z, sizeof a); old_fold<8>(st, a, c2); }
  else { float a[1] = {z[0]}; old_fold<1>(st, a, c2); }
}
void merge_any(SmState& a, const SmState& b, Scale2 c2) { merge<false>(a, b, c2); }
void merge_any(OldState& a, const OldState& b, Scale2 c2) { old_merge(a, b, c2); }
float ln_of(const SmState& a) { return ln_sum(a); }
float ln_of(const OldState& a) { return logf(a.s); }

// One block over one row (16-byte aligned: no scalar head): returns the block's final state.
template <class St>
St block_row(const std::vector<float>& z, int VEC, Scale2 c2) {
  const int nvec = V / VEC;
  std::vector<St> st(BLOCK);
  std::vector<float> buf(UNROLL * VEC);
  for (int tid = 0; tid < BLOCK; ++tid) {
    St s{};
    s.zmax = -INFINITY;
    int i = tid;
    for (; i + (UNROLL - 1) * BLOCK < nvec; i += UNROLL * BLOCK) {
      for (int u = 0; u < UNROLL; ++u)
        std::memcpy(&buf[u * VEC], &z[static_cast<size_t>(i + u * BLOCK) * VEC], VEC * sizeof(float));
      fold_any(s, buf.data(), UNROLL * VEC, c2);
    }
    for (; i < nvec; i += BLOCK) fold_any(s, &z[static_cast<size_t>(i) * VEC], VEC, c2);
    const int tail0 = nvec * VEC;
    if (tail0 + tid < V) fold_any(s, &z[tail0 + tid], 1, c2);
    st[tid] = s;
  }
  std::vector<St> warp0(BLOCK / 32);
  for (int w = 0; w < BLOCK / 32; ++w) {
    St lane[32];
    for (int l = 0; l < 32; ++l) lane[l] = st[w * 32 + l];
    for (int o = 16; o > 0; o >>= 1) {
      St next[32];
      for (int l = 0; l < 32; ++l) {
        next[l] = lane[l];
        merge_any(next[l], lane[l + o < 32 ? l + o : l], c2);  // __shfl_down_sync: own value past lane 31
      }
      std::memcpy(lane, next, sizeof lane);
    }
    warp0[w] = lane[0];
  }
  St a = warp0[0];
  for (int w = 1; w < BLOCK / 32; ++w) merge_any(a, warp0[w], c2);
  return a;
}

float to_bf16(float x) {  // round to nearest even, as the logits would be stored
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&x, &u, 4);
  return x;
}

}  // namespace

int main() {
  const Scale2 c2 = make_c2(1.f);
  for (int bf16 = 0; bf16 < 2; ++bf16) {
    const int VEC = bf16 ? 8 : 4;
    std::mt19937_64 gen(1234 + bf16);
    std::normal_distribution<double> nd(0.0, 2.0);
    std::uniform_real_distribution<double> up(0.5, 0.999);
    std::uniform_int_distribution<int> lab(0, V - 1);
    double sum[2] = {0, 0}, sabs[2] = {0, 0}, mx[2] = {0, 0}, pmin = 1, pmax = 0;
    std::vector<float> z(V);
    for (int row = 0; row < ROWS; ++row) {
      for (int v = 0; v < V; ++v) z[v] = static_cast<float>(nd(gen));
      const int y = lab(gen);
      const double p = up(gen);
      z[y] = static_cast<float>(std::log((V - 1) * std::exp(2.0)) + std::log(p / (1 - p)));
      if (bf16) for (float& x : z) x = to_bf16(x);
      // float64 oracle: log p_y = -log(sum_v e^{z_v - z_y}) (no cancellation for a max label).
      double zm = -INFINITY;
      for (float x : z) zm = x > zm ? x : zm;
      double s = 0;
      for (float x : z) s += std::exp(static_cast<double>(x) - zm);
      const double ref = (static_cast<double>(z[y]) - zm) - std::log(s);
      pmin = std::fmin(pmin, std::exp(ref));
      pmax = std::fmax(pmax, std::exp(ref));
      const SmState a = block_row<SmState>(z, VEC, c2);
      const OldState b = block_row<OldState>(z, VEC, c2);
      const float got[2] = {label_logp(z[y], a, 1.f, ln_of(a)), fminf((z[y] - b.zmax) - ln_of(b), 0.f)};
      for (int k = 0; k < 2; ++k) {
        const double e = static_cast<double>(got[k]) - ref;
        sum[k] += e;
        sabs[k] += std::fabs(e);
        mx[k] = std::fmax(mx[k], std::fabs(e));
      }
    }
    const char* names[2] = {"new", "old"};
    for (int k = 0; k < 2; ++k)
      std::printf("bias %s %s %.6e %.6e %.6e %.4f %.4f\n", bf16 ? "bf16" : "fp32", names[k], sum[k] / ROWS,
                  sabs[k] / ROWS, mx[k], pmin, pmax);
  }
  return 0;
}
