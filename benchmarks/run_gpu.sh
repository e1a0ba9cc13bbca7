#!/usr/bin/env bash
# Build, test, sanitize and benchmark vespo on one CUDA GPU (H100 / H200). About 4 minutes (an H200: 245 s).
#
#   bash benchmarks/run_gpu.sh          # from anywhere; runs in the repository root
#
#   1. pip install --no-build-isolation --no-deps .   (CUDA module for this GPU's architecture only)
#   2. tests/cuda_smoke.py, then python -m pytest tests --ignore=tests/trainer -m "not slow"
#      (pytest-xdist, 12 workers, when installed; PYTEST_ARGS adds arguments, e.g. PYTEST_ARGS="-k cuda")
#   3. python benchmarks/bench_vespo_loss.py --device cuda --json benchmarks/results/<gpu>.json
#   4. compute-sanitizer memcheck on tests/cuda_smoke.py (all shapes, incl. V=151937), and
#      racecheck on its --quick shapes
#
# A failing step does not stop the later ones; the exit code is non-zero if any failed. Each step has
# a time limit (typical runs take far less); SKIP_TESTS=1, SKIP_SANITIZER=1 or SKIP_BENCH=1 leave a step
# out on a rerun, and BENCH_ARGS adds arguments to the benchmark (e.g. BENCH_ARGS="--no-compile").
#
# Liger-Kernel (the GPU baseline) is not in the GPU image and that machine has no network. To include
# it, fetch its wheel on the development machine first and carry the folder (it is git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: -d benchmarks/wheels liger-kernel==0.8.5
#   run(command="bash benchmarks/run_gpu.sh", carry=["benchmarks/wheels"])
# With $OUT set (the device tool's return folder), the log is written there as it goes and the JSON is
# copied there right after the benchmark, so a run cut off in the sanitizer step still returns both.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
LOG=${OUT:-/tmp}/run_gpu.log
: >"$LOG"
FAILED=()

step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s) ===" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - t0))s ===" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || FAILED+=("$name(rc=$rc)")
  return "$rc"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
$PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])" 2>&1 | tee -a "$LOG"

# Liger-Kernel from a carried wheel, when it is not installed (pure Python; torch and triton are there).
if ! $PY -c "import liger_kernel" 2>/dev/null; then
  if ls benchmarks/wheels/liger_kernel-*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/vespo_site benchmarks/wheels/liger_kernel-*.whl \
      2>&1 | tee -a "$LOG" && export PYTHONPATH=/tmp/vespo_site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "liger-kernel: not installed and no wheel in benchmarks/wheels (the benchmark says so and goes on)" | tee -a "$LOG"
  fi
fi

# 1. Build. "native" = the architecture of the GPU in this machine: one target instead of three.
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
step build 240 $PY -m pip install --no-build-isolation --no-deps -q \
  -C cmake.define.CMAKE_CUDA_ARCHITECTURES=native -C cmake.define.VESPO_REQUIRE_CUDA=ON .
step import 60 $PY -c "import torch, vespo_ext._cuda, vespo_ext._backend as b; \
assert b.has_kernels(torch.device('cuda')); print('vespo_ext._cuda loaded:', vespo_ext._cuda.__file__)"

# 2. A first look (seconds): the smoke test without the sanitizer, then the kernel test suite
#    (CPU and CUDA tests under this image's torch; the trainer's tests need Ray and skip here),
#    spread over the cores with pytest-xdist when it is installed.
step smoke 60 $PY tests/cuda_smoke.py
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 12")
# shellcheck disable=SC2086
[ -n "${SKIP_TESTS:-}" ] || step tests 180 $PY -m pytest tests --ignore=tests/trainer -q -m "not slow" \
  -p no:cacheprovider $XDIST ${PYTEST_ARGS:-}

# 3. The benchmark (T=32768 V=151936 bf16 by default on CUDA).
GPU=$($PY -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '_', torch.cuda.get_device_name().lower()).strip('_'))" 2>/dev/null || echo gpu)
JSON=benchmarks/results/${GPU}.json
# shellcheck disable=SC2086
[ -n "${SKIP_BENCH:-}" ] || step bench 200 $PY benchmarks/bench_vespo_loss.py --device cuda --json "$JSON" ${BENCH_ARGS:-}

if [ -n "${OUT:-}" ] && [ -f "$JSON" ]; then cp "$JSON" "$OUT/"; fi

# 4. compute-sanitizer on the smoke test. Without torch's caching allocator every tensor is its own
#    cudaMalloc, so an out-of-bounds access falls outside an allocation and memcheck reports it.
if [ -n "${SKIP_SANITIZER:-}" ]; then
  echo "sanitizer: skipped (SKIP_SANITIZER)" | tee -a "$LOG"
elif command -v compute-sanitizer >/dev/null; then
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 step memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 1 \
    --target-processes all $PY tests/cuda_smoke.py
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 step racecheck 60 compute-sanitizer --tool racecheck --error-exitcode 1 \
    --target-processes all $PY tests/cuda_smoke.py --quick
else
  echo "compute-sanitizer not found: no memcheck/racecheck (the smoke test ran plainly in step 2)" | tee -a "$LOG"
fi

if [ ${#FAILED[@]} -gt 0 ]; then
  echo "FAILED steps: ${FAILED[*]} (total ${SECONDS}s)" | tee -a "$LOG"
  exit 1
fi
echo "all steps passed (total ${SECONDS}s)" | tee -a "$LOG"
