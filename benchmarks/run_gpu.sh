#!/usr/bin/env bash
# Everything issues 13 and 18 need from one CUDA GPU (H100 / H200), in ONE command, most valuable first,
# writing results as it goes. Budget: BUDGET_S (default 530 s) for the whole script; every step has its
# own limit, cut to what is left of the budget, and a step that no longer fits is skipped (logged).
#
# ---- How the lead runs it (device tool) -------------------------------------------------------------
#   0. Once, on the development machine (network), IN THE CHECKOUT THE DEVICE TOOL SENDS (the session's
#      own, not a helper's worktree): the wheels the GPU image lacks (~6 MB, git-ignored), with a Python
#      that has torch (the deepspeed wheel is built from its sdist):
#        . /work/venv/bin/activate && bash benchmarks/gpu/fetch_wheels.sh
#                  # liger-kernel, deepspeed, hjson, pydantic(+core, annotated-types, typing-*), omegaconf
#      (or copy a benchmarks/wheels/ folder fetched elsewhere), then rehearse here at no GPU cost:
#        DRY_RUN=cpu bash benchmarks/run_gpu.sh   # with PYTHONPATH=python:trainer (the worktree's code)
#   1. run(command="bash benchmarks/run_gpu.sh", carry=["benchmarks/wheels"], timeout_s=600)
#      One call, ~8 min of the 15-minute device budget, plus ~1-2 min to start the machine: there is room
#      for ONE such run, not two; a rerun of part of it must fit what is left, e.g.
#        run(command="SKIP_EX2=1 SKIP_TESTS=1 SKIP_SANITIZER=1 BUDGET_S=200 bash benchmarks/run_gpu.sh", ...)
#      then give_back() at once.
#   2. What comes back under files_at (the device tool returns at most 8 files; these are 8):
#        <gpu>_run_gpu.log        the whole log, written as it goes (each step: "=== name: rc=.. in ..s ===")
#        <gpu>_summary.txt        one line per step: name, rc (or SKIPPED), seconds, limit
#        <gpu>_ex2_scan.txt       MUFU ex2.approx.ftz.f32 vs float64 exp2 over fp32 [-32, 0), per binade
#        <gpu>_ab_kernels.json    benchmarks/gpu/ab_kernels.py: the CUDA kernel generations v1, v2, v2-mufu,
#                                 v2-split timed in turns in one process (fwd, bwd, fwd+bwd, in place) + checks
#        <gpu>_v1.json            bench_vespo_loss, T=32768 V=151936 bf16, kernels v1 (the default), with Liger
#        <gpu>_v2.json            the same with the fastest v2 kernels of the A/B (VESPO_CUDA_KERNELS), no compile
#        linear_<gpu>_bf16.json   bench_linear_loss, T=32768 H=4096 V=151936 bf16 (fused-linear vs matmul+op
#                                 vs Liger's fused-linear VESPO; peak memory by torch.cuda.max_memory_allocated)
#        <gpu>_trainer_check.json benchmarks/gpu/trainer_gpu_check.py: CUDA rollout + DeepSpeed/NCCL steps
#      Copy them into benchmarks/results/ (the same names; the JSONs are written there too on the GPU box).
#   Without $OUT (a GPU box of your own) everything is written to benchmarks/results/ only.
#
# ---- Steps, in order (estimated seconds on an H200 / limit) --------------------------------------------
# ONE build holds both generations of the CUDA log-prob kernels; VESPO_CUDA_KERNELS (or, inside one process,
# vespo_ext._cuda.set_kernel_variant) picks v1 (the default), v2 (software exp2), v2-mufu (ex2.approx) or
# v2-split (ex2.approx on a 1/256-split argument) per launch, so the A/B needs no second build.
#   wheels          carried wheels the image lacks -> /tmp/vespo_site on PYTHONPATH      (5)
#   ex2_scan        nvcc + run benchmarks/gpu/ex2_error_scan.cu                         (15 / 60)
#   build           pip install . for this GPU's arch only                              (35 / 150)
#   import          vespo_ext._cuda loads, has the kernel variants, v1 by default       (5 / 30)
#   smoke           tests/cuda_smoke.py, every variant of $KERNELS vs float64            (20 / 90)
#   bias            benchmarks/gpu/confident_bias.py: per-token bias on confident rows, every variant (20 / 90)
#   ab              benchmarks/gpu/ab_kernels.py: the variants timed in turns, one process (20 / 120)
#   confident       tests/test_confident_rows.py, CUDA cases incl. slow, [cuda] = v1 and [cuda-v2]  (80 / 150)
#   bench_v1        bench_vespo_loss --device cuda (T=32768 V=151936 bf16), v1, with Liger and compile (40 / 120)
#   bench_v2        the same, the fastest v2 variant of the A/B (BENCH_V2 overrides), --no-compile (35 / 120)
#   trainer         benchmarks/gpu/trainer_gpu_check.py --device cuda (no Ray)          (40 / 120)
#   tests           pytest tests -m "cuda and not slow": every CUDA case as [cuda] (v1) and [cuda-v2]
#                   (the CPU ones run in CI; test_confident_rows.py ran above)          (80 / 150)
#   memcheck        compute-sanitizer memcheck on tests/cuda_smoke.py --quick, v1 and v2 (no caching allocator) (50 / 120)
#   linear          bench_linear_loss --device cuda (no eager variant: 60 GB, known), the default chunk
#                   (3533 tokens: 1.07 GB) and 1766 / 1324 / 883 (0.54 / 0.40 / 0.27 GB), for issue 13's
#                   3 GB: the fp32 weight-gradient accumulator alone is 2.49 GB                (95 / 150)
#   racecheck       compute-sanitizer racecheck on tests/cuda_smoke.py --quick, v1 and v2  (30 / 60)
#   Sum of the estimates ~570 s: what runs out of budget is the end of the list (racecheck, then the tail of
#   linear), logged as SKIPPED (budget). v2-mufu and v2-split differ from v2 only in the forward's
#   exponential: smoke, bias and ab cover them; their test-suite and benchmark runs are opt-in (ALL_KERNELS=1).
#
# Switches: SKIP_EX2, SKIP_AB, SKIP_CONFIDENT, SKIP_BENCH, SKIP_TRAINER, SKIP_LINEAR, SKIP_TESTS, SKIP_SANITIZER=1
# leave steps out; KERNELS=v1,v2,... the variants of smoke/bias/ab (default all four); BENCH_V2=<variant>
# the second benchmark's; ALL_KERNELS=1 adds, at the end, the confident-rows tests and a benchmark for each
# of v2-mufu and v2-split (more than the default budget); BENCH_ARGS, LINEAR_ARGS, PYTEST_ARGS add arguments;
# BUDGET_S=<seconds>; NCU=1 adds an Nsight Compute step for v1 and v2 (the loss kernels' instructions,
# bytes, registers and occupancy at T=8192: benchmarks/gpu/one_step.py). DRY_RUN=1 prints the steps with
# their limits and runs nothing but the wheel selection (works on any machine: bash benchmarks/run_gpu.sh
# with DRY_RUN=1); DRY_RUN=cpu also rehearses on the CPU what can run there (the trainer check with gloo, a
# tiny bench_linear_loss and ab_kernels, the ex2 scan's compile for sm_90): 1-3 min, worth it before
# spending GPU time. A failing step does not stop the later ones; the exit code is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PATH=$PATH:/usr/local/cuda/bin  # nvcc and compute-sanitizer, where the image does not put them on PATH
BUDGET=${BUDGET_S:-530}
DRY=${DRY_RUN:-}
RESULTS=benchmarks/results
DEST=${OUT:-$RESULTS}  # where the log and summary are written as the run goes
if [ -n "$DRY" ] && [ -z "${OUT:-}" ]; then DEST=/tmp/run_gpu_dry; fi  # a rehearsal leaves the checkout clean
mkdir -p "$RESULTS" "$DEST"

GPU=$($PY -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '_', torch.cuda.get_device_name().lower()).strip('_'))" \
  2>/dev/null)
[ -n "$GPU" ] || GPU=gpu
LOG=$DEST/${GPU}_run_gpu.log
SUMMARY=$DEST/${GPU}_summary.txt
: >"$LOG"
: >"$SUMMARY"
FAILED=()

say() { echo "$*" | tee -a "$LOG"; }

keep() {  # keep FILE...: copy results into $OUT as soon as they exist (a run cut off later still returns them)
  local f
  for f in "$@"; do
    if [ -n "${OUT:-}" ] && [ -f "$f" ] && [ "$(dirname "$f")" != "$OUT" ]; then cp "$f" "$OUT/"; fi
  done
}

step() {  # step NAME LIMIT_S CMD...  (limit cut to the budget left; skipped when under 15 s are left)
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS - 5))
  [ "$limit" -le "$left" ] || limit=$left
  if [ -n "$DRY" ]; then
    say "[dry] $name (limit ${limit}s): $*"
    printf '%-16s %-8s %5s %5s\n' "$name" dry 0 "$limit" >>"$SUMMARY"
    return 0
  fi
  if [ "$limit" -lt 15 ]; then
    say "=== $name: SKIPPED (budget: ${SECONDS}s of ${BUDGET}s used) ==="
    printf '%-16s %-8s %5s %5s\n' "$name" SKIPPED 0 "$limit" >>"$SUMMARY"
    FAILED+=("$name(budget)")
    return 1
  fi
  local t0=$SECONDS
  say "=== $name (limit ${limit}s, at ${SECONDS}s) ==="
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  say "=== $name: rc=$rc in $((SECONDS - t0))s ==="
  printf '%-16s %-8s %5s %5s\n' "$name" "rc=$rc" "$((SECONDS - t0))" "$limit" >>"$SUMMARY"
  [ "$rc" -eq 0 ] || FAILED+=("$name(rc=$rc)")
  return "$rc"
}

skip() { say "=== $1: skipped ($2) ==="; printf '%-16s %-8s %5s %5s\n' "$1" skipped 0 0 >>"$SUMMARY"; }

say "run_gpu.sh: budget ${BUDGET}s, results in $DEST${DRY:+ (DRY_RUN: nothing runs)}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true; } | tee -a "$LOG"
$PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])" \
  2>&1 | tee -a "$LOG"

# ---- wheels: only those the image lacks (or has older); pure Python but pydantic-core (cp312) ----------
if ls benchmarks/wheels/*.whl >/dev/null 2>&1; then
  mapfile -t WHEELS < <($PY benchmarks/gpu/install_wheels.py benchmarks/wheels 2> >(tee -a "$LOG" >&2))
  if [ ${#WHEELS[@]} -gt 0 ] && { [ -z "$DRY" ] || [ "$DRY" = cpu ]; }; then  # the CPU rehearsal imports them too
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/vespo_site "${WHEELS[@]}" \
      2>&1 | tee -a "$LOG"
  fi
  [ ${#WHEELS[@]} -eq 0 ] || export PYTHONPATH=/tmp/vespo_site${PYTHONPATH:+:$PYTHONPATH}
else
  say "benchmarks/wheels: none carried (benchmarks/gpu/fetch_wheels.sh): no Liger baseline, no trainer check unless installed"
fi
BASE_PYTHONPATH=${PYTHONPATH:-}

if [ "$DRY" = cpu ]; then  # the CPU rehearsal: real runs of what needs no GPU, then the dry list below
  DRY=
  step rehearse_ex2 120 nvcc -O3 -std=c++17 -arch=sm_90 -I csrc/include benchmarks/gpu/ex2_error_scan.cu \
    -o /tmp/ex2_scan_sm90
  step rehearse_bias 120 "$PY" benchmarks/gpu/confident_bias.py --device cpu --T 256
  step rehearse_ab 120 "$PY" benchmarks/gpu/ab_kernels.py --device cpu --T 64 --V 1000 --json /tmp/run_gpu_ab_cpu.json
  step rehearse_smoke 120 "$PY" tests/cuda_smoke.py --device cpu --quick
  step rehearse_trainer 300 "$PY" benchmarks/gpu/trainer_gpu_check.py --device cpu --steps 1
  step rehearse_linear 300 "$PY" benchmarks/bench_linear_loss.py --device cpu --tiny \
    --variants fused-linear,matmul+op,matmul+op-inplace,liger --no-memory
  DRY=cpu
  BUDGET=$((BUDGET + SECONDS))  # the dry list below shows the GPU limits, not what the rehearsal left
fi

# ---- 1. MUFU error scan (needs only nvcc): the number the mufu forward's accuracy rests on -------------
if [ -z "${SKIP_EX2:-}" ]; then
  EX2=$RESULTS/${GPU}_ex2_scan.txt
  step ex2_build 60 nvcc -O3 -std=c++17 -arch=native -I csrc/include benchmarks/gpu/ex2_error_scan.cu -o /tmp/ex2_scan
  [ -n "$DRY" ] || [ -x /tmp/ex2_scan ] && step ex2_scan 60 bash -c "set -o pipefail; /tmp/ex2_scan -32 | tee $EX2"
  keep "$EX2"
fi

# ---- 2. one build (both kernel generations; v1's exponential: poly, the default) and a first look ------
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
BUILD=(-m pip install --no-build-isolation --no-deps -q -C cmake.define.CMAKE_CUDA_ARCHITECTURES=native
       -C cmake.define.VESPO_REQUIRE_CUDA=ON)
IMPORT_CHECK="import torch, vespo_ext, vespo_ext._cuda as c, vespo_ext._backend as b, vespo_ext._build_info as i, sys; \
assert b.has_kernels(torch.device('cuda')); print('vespo_ext', vespo_ext.__file__, '| v1 forward exp:', i.cuda_fwd_exp, \
'| archs:', i.cuda_architectures, '| kernels:', c.kernel_variant()); \
sys.exit(0 if i.cuda_fwd_exp == 'poly' and c.kernel_variant() == sys.argv[1] else 'wrong build or kernel variant')"
unset VESPO_CUDA_KERNELS  # the default (v1) unless a step sets it
step build 150 "$PY" "${BUILD[@]}" -C cmake.define.VESPO_FWD_EXP=poly .  # explicit: the CMake cache keeps a value
step import 30 "$PY" -c "$IMPORT_CHECK" v1
KERNELS=${KERNELS:-v1,v2,v2-mufu,v2-split}
say "######## CUDA kernel variants of the A/B: $KERNELS (one build, chosen per launch) ########"
step smoke 90 "$PY" tests/cuda_smoke.py --kernels "$KERNELS"
[ -n "${SKIP_CONFIDENT:-}" ] || step bias 90 "$PY" benchmarks/gpu/confident_bias.py --device cuda --T 4096 \
  --kernels "$KERNELS"
AB=$RESULTS/${GPU}_ab_kernels.json
if [ -z "${SKIP_AB:-}" ]; then
  step ab 120 "$PY" benchmarks/gpu/ab_kernels.py --variants "$KERNELS" --json "$AB"
  keep "$AB"
fi
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 4")
# shellcheck disable=SC2086
[ -n "${SKIP_CONFIDENT:-}" ] || step confident 150 "$PY" -m pytest tests/test_confident_rows.py -m cuda -q \
  -p no:cacheprovider $XDIST

# bench NAME VARIANT [ARGS...]: bench_vespo_loss with VESPO_CUDA_KERNELS=VARIANT (and an Nsight step with NCU=1)
bench() {
  local name=$1 v=$2
  shift 2
  if [ -z "${SKIP_BENCH:-}" ]; then
    local json=$RESULTS/${GPU}_$name.json
    # shellcheck disable=SC2086
    step "bench_$name" 120 env VESPO_CUDA_KERNELS="$v" "$PY" benchmarks/bench_vespo_loss.py --device cuda --T 32768 \
      --V 151936 --dtype bf16 --json "$json" --note "run_gpu.sh, CUDA kernels $v (VESPO_CUDA_KERNELS)" "$@" \
      ${BENCH_ARGS:-}
    keep "$json"
  fi
  # opt-in (NCU=1; ~30-60 s a variant, not in the default budget's estimate): instructions and bytes per
  # element of the loss kernels, in the log (smsp__inst_executed x 32 / (T V) = instructions per element)
  if [ -n "${NCU:-}" ] && { command -v ncu >/dev/null || [ -n "$DRY" ]; }; then
    local metrics=smsp__inst_executed.sum,dram__bytes_read.sum,dram__bytes_write.sum,launch__registers_per_thread
    step "ncu_$name" 120 env VESPO_CUDA_KERNELS="$v" ncu --kernel-name regex:'logprob_(fwd|bwd)(_v2)?_kernel' \
      --launch-count 2 --section SpeedOfLight --section Occupancy --metrics "$metrics" "$PY" benchmarks/gpu/one_step.py \
      --T 8192
  fi
}
bench v1 v1
# the second benchmark: the v2 variant with the shortest fwd+bwd in the A/B (v2 if the A/B did not run)
BENCH_V2=${BENCH_V2:-$($PY -c "import json, sys; r = json.load(open(sys.argv[1]))['variants']; \
print(min((v for v in r if v.startswith('v2')), key=lambda v: r[v]['fwd_bwd']))" "$AB" 2>/dev/null || echo v2)}
bench v2 "$BENCH_V2" --no-compile

# ---- 4. the trainer's GPU path (CUDA rollout, DeepSpeed world of 1 on NCCL), in-process, no Ray --------
if [ -z "${SKIP_TRAINER:-}" ]; then
  TJSON=$RESULTS/${GPU}_trainer_check.json
  # DS_ACCELERATOR: the carried DeepSpeed wheel was built on a CPU machine (its build info says "cpu"; the
  # accelerator is detected at run time anyway, this only makes it explicit)
  step trainer 120 env DS_ACCELERATOR=cuda "$PY" benchmarks/gpu/trainer_gpu_check.py --device cuda --json "$TJSON"
  keep "$TJSON"
fi

# ---- 5. the CUDA cases of the test suite, [cuda] (v1) and [cuda-v2] (the CPU cases run in CI) -------------
XDIST12=$($PY -c "import xdist" 2>/dev/null && echo "-n 12")
# shellcheck disable=SC2086
[ -n "${SKIP_TESTS:-}" ] || step tests 150 "$PY" -m pytest tests --ignore=tests/trainer \
  --ignore=tests/test_confident_rows.py -q -m "cuda and not slow" \
  -p no:cacheprovider $XDIST12 ${PYTEST_ARGS:-}

# ---- 6. compute-sanitizer on the smoke test (v1 and v2: v2-mufu/v2-split access memory as v2 does).
#         Without torch's caching allocator every tensor is its own cudaMalloc, so an out-of-bounds access
#         falls outside an allocation and memcheck reports it. racecheck runs last (step 8).
HAVE_SANITIZER=
if [ -n "${SKIP_SANITIZER:-}" ]; then
  skip sanitizer SKIP_SANITIZER
elif command -v compute-sanitizer >/dev/null || [ -n "$DRY" ]; then
  HAVE_SANITIZER=1
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 step memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 1 \
    --target-processes all "$PY" tests/cuda_smoke.py --quick --kernels v1,v2
else
  skip sanitizer "compute-sanitizer not found"
fi

# ---- 7. fused linear + loss (issue 13) -------------------------------------------------------------------
if [ -z "${SKIP_LINEAR:-}" ]; then
  LJSON=$RESULTS/linear_${GPU}_bf16.json
  # shellcheck disable=SC2086
  step linear 150 "$PY" benchmarks/bench_linear_loss.py --device cuda --T 32768 --H 4096 --V 151936 --dtype bf16 \
    --variants fused-linear,fused-linear@1766,fused-linear@1324,fused-linear@883,matmul+op,matmul+op-inplace,liger \
    --iters 5 --json "$LJSON" --note "run_gpu.sh" \
    ${LINEAR_ARGS:-}
  keep "$LJSON"
fi

# ---- 8. racecheck, then (ALL_KERNELS=1) the suite's confident rows and a benchmark for v2-mufu, v2-split ----
if [ -n "$HAVE_SANITIZER" ]; then
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 step racecheck 60 compute-sanitizer --tool racecheck --error-exitcode 1 \
    --target-processes all "$PY" tests/cuda_smoke.py --quick --kernels v1,v2
fi
if [ -n "${ALL_KERNELS:-}" ]; then
  for v in v2-mufu v2-split; do
    # shellcheck disable=SC2086
    step "confident_$v" 120 env VESPO_CUDA_KERNELS="$v" "$PY" -m pytest tests/test_confident_rows.py -m cuda -q \
      -k "not cuda-v2" -p no:cacheprovider $XDIST
    bench "$v" "$v" --no-compile
  done
fi

tee -a "$LOG" <"$SUMMARY"
if [ -n "${OUT:-}" ] && [ -z "$DRY" ]; then cp "$LOG" "$SUMMARY" "$RESULTS/" 2>/dev/null || true; fi
if [ ${#FAILED[@]} -gt 0 ]; then
  say "FAILED steps: ${FAILED[*]} (total ${SECONDS}s of ${BUDGET}s)"
  exit 1
fi
say "all steps passed (total ${SECONDS}s of ${BUDGET}s)"
