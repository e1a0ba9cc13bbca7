// Host-side check of the CUDA forward's software exp2 (csrc/cuda/common.cuh, exp2_poly), compiled by
// nvcc as host code: the same source the kernels inline. Prints "max_ulp mean_rel" over random inputs
// and "x value" for special inputs; tests/test_cuda_host_math.py checks the numbers. Also the v2 split
// exponential's factor (softmax_state.cuh: SplitExp) with exp2f standing in for MUFU on the 1/256 grid:
// "split max_ulp mean_rel" then isolates the factor's truncation, which must have no sign of its own.
#include <cmath>
#include <cstdio>
#include <random>

#include "../../csrc/cuda/softmax_state.cuh"

using vespo::cuda::detail::exp2_poly;
using vespo::cuda::detail::SplitExp;

int main() {
  std::mt19937_64 gen(12345);
  std::uniform_real_distribution<double> wide(-40.0, 0.5), near0(-1e-3, 0.0);
  double max_ulp = 0.0, sum_rel = 0.0, sum_rel0 = 0.0;
  const long n = 2000000;
  for (long i = 0; i < n; ++i) {
    const float x = static_cast<float>(wide(gen));
    const double ref = std::exp2(static_cast<double>(x)), y = exp2_poly(x);
    const float rf = static_cast<float>(ref);
    const double ulp = std::nextafter(rf, INFINITY) - rf;
    max_ulp = std::fmax(max_ulp, std::fabs(y - ref) / ulp);
    sum_rel += (y - ref) / ref;
    const float x0 = static_cast<float>(near0(gen));
    sum_rel0 += (exp2_poly(x0) - std::exp2(static_cast<double>(x0))) / std::exp2(static_cast<double>(x0));
  }
  std::printf("stats %.6f %.6e %.6e\n", max_ulp, sum_rel / n, sum_rel0 / n);
  double smax = 0.0, ssum = 0.0;
  for (long i = 0; i < n; ++i) {
    const float x = static_cast<float>(wide(gen));
    if (x > 0.f) continue;  // the forward's domain
    const double ref = std::exp2(static_cast<double>(x)), y = SplitExp::ex2(x);
    const float rf = static_cast<float>(ref);
    smax = std::fmax(smax, std::fabs(y - ref) / (std::nextafter(rf, INFINITY) - rf));
    ssum += (y - ref) / ref;
  }
  std::printf("split %.6f %.6e\n", smax, ssum / n);
  const float special[] = {0.f, -0.f, -1.f, 1.f, -0.5f, -125.f, -125.5f, -1e30f, -INFINITY, NAN, 127.f};
  for (float x : special) std::printf("special %.9g %.9g\n", x, exp2_poly(x));
  const float sx[] = {0.f, -1.f, -0.5f, -1e30f, -INFINITY, NAN};
  for (float x : sx) std::printf("splitspecial %.9g %.9g\n", x, SplitExp::ex2(x));
  return 0;
}
