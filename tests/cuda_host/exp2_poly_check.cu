// Host-side check of the CUDA forward's software exp2 (csrc/cuda/common.cuh, exp2_poly), compiled by
// nvcc as host code: the same source the kernels inline. Prints "max_ulp mean_rel" over random inputs
// and "x value" for special inputs; tests/test_cuda_host_math.py checks the numbers.
#include <cmath>
#include <cstdio>
#include <random>

#include "../../csrc/cuda/common.cuh"

using vespo::cuda::detail::exp2_poly;

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
  const float special[] = {0.f, -0.f, -1.f, 1.f, -0.5f, -125.f, -125.5f, -1e30f, -INFINITY, NAN, 127.f};
  for (float x : special) std::printf("special %.9g %.9g\n", x, exp2_poly(x));
  return 0;
}
