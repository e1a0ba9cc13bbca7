"""
Benchmark the fused VESPO policy loss (vespo_ext) against plain PyTorch, torch.compile and, on CUDA,
Liger-Kernel's Triton GRPO/VESPO loss. One run, same inputs, same thread count, side by side:

  fused          vespo_ext.vespo_loss / policy_loss on packed (T, V) logits + cu_seqlens;
                 the gradient goes to a new (T, V) buffer (the default)
  fused-inplace  the same with grad_inplace=True: the gradient overwrites the logits. The logits are
                 cloned before every iteration, OUTSIDE the timed region (the clone is not timed)
  eager          the fastest plain-PyTorch version we could write: per-token log-probs in fp32 by
                 -cross_entropy(reduction="none") or log_softmax+gather (both are timed at start-up
                 and the faster is kept), then the docs/spec.md sequence math (index_add, detached phi)
  compiled       torch.compile(eager), default inductor
  liger*         (CUDA only) liger_kernel.transformers.grpo_loss.triton_grpo_loss, which also takes
                 logits (padded (B, L+1, V)) and fuses log-softmax + loss + grad in Triton; new grad
                 buffer (liger) or written over the logits (liger-inplace, Liger's own default)

For each: forward+backward time (median over --iters after --warmup; forward and backward also
separately), and the peak memory beyond the inputs of one forward+backward, gradient included.

    python benchmarks/bench_vespo_loss.py                          # CUDA if there is one, else CPU
    python benchmarks/bench_vespo_loss.py --device cpu --dtype bf16 --json benchmarks/results/cpu.json
    python benchmarks/bench_vespo_loss.py --losses vespo,grpo --no-compile
"""
import argparse
import ctypes
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import time

# CUDA: the variants take turns and need buffers of several sizes (eager: a few fp32 copies of the
# logits); expandable segments keep the caching allocator from fragmenting between them.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import vespo_ext  # noqa: E402
from host_info import host_info, status_kb  # noqa: E402  (benchmarks/host_info.py, a sibling module)

# -----------------------------------------------------------------------------
# Arguments

parser = argparse.ArgumentParser(description="fused VESPO loss vs eager / torch.compile / Liger")
parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--T", type=int, default=None, help="tokens (default: CPU 2048, CUDA 32768)")
parser.add_argument("--V", type=int, default=None, help="vocabulary (default: CPU 32768, CUDA 151936)")
parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="logits (default: CPU fp32, CUDA bf16)")
parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads, all variants")
parser.add_argument("--iters", type=int, default=None, help="timed iterations (default: CPU 10, CUDA 20)")
parser.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default: CPU 3, CUDA 5)")
parser.add_argument("--seqs", type=int, default=16, help="sequences the T tokens are split into (equal lengths)")
parser.add_argument("--temperature", type=float, default=1.0)
parser.add_argument("--losses", default="vespo", help="comma list of losses, e.g. vespo,grpo")
parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
parser.add_argument("--json", default=None, metavar="PATH", help="write all results to this file")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--note", default=None, help="free text kept in the JSON (how the run was made, the build...)")
parser.add_argument("--_mem-worker", dest="mem_worker", default=None, help=argparse.SUPPRESS)  # internal, CPU memory
parser.add_argument("--_mem-loss", dest="mem_loss", default=None, help=argparse.SUPPRESS)
parser.add_argument("--_logp-impl", dest="logp_impl", default=None, help=argparse.SUPPRESS)
args = parser.parse_args()

device = torch.device(args.device)
is_cuda = device.type == "cuda"
if is_cuda and not torch.cuda.is_available():
    sys.exit("--device cuda: torch sees no CUDA device")
T = args.T or (32768 if is_cuda else 2048)
V = args.V or (151936 if is_cuda else 32768)
dtype_name = args.dtype or ("bf16" if is_cuda else "fp32")
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
iters = args.iters or (20 if is_cuda else 10)
warmup = args.warmup if args.warmup is not None else (5 if is_cuda else 3)
losses = [s.strip() for s in args.losses.split(",") if s.strip()]
for name in losses:
    if name not in vespo_ext.LOSSES:
        sys.exit(f"--losses: {name!r} is not one of {vespo_ext.LOSSES}")
if T % args.seqs != 0:
    sys.exit(f"--T {T} must be a multiple of --seqs {args.seqs} (equal-length sequences, so that Liger's "
             "padded layout holds exactly the same tokens)")
S, L = args.seqs, T // args.seqs
torch.set_num_threads(args.threads)  # eager, compiled and fused (the fused op reads torch.get_num_threads())
tau = args.temperature
MB = 1e6  # memory is reported in MB = 10^6 bytes
K_POS, LAM_POS, K_NEG, LAM_NEG = 2.0, 3.0, 3.0, 2.0  # docs/spec.md defaults, also the fused op's
EPS, CLIP_C = 0.2, 3.0  # GRPO defaults (docs/spec.md)
worker = args.mem_worker is not None


def log(*a):
    if not worker:
        print(*a, flush=True)


def sync():
    if is_cuda:
        torch.cuda.synchronize()


# -----------------------------------------------------------------------------
# The machine


def machine_info():
    info = host_info(torch.__version__, args.threads)
    info["vespo_ext"] = vespo_ext.__version__
    try:  # which build of the extension ran (the installed one, not necessarily this checkout's HEAD)
        from vespo_ext import _backend
        mod = _backend.cuda() if is_cuda else _backend.core()
        info["extension"] = mod.__file__
        info["extension_built"] = datetime.datetime.fromtimestamp(os.path.getmtime(mod.__file__)).isoformat(
            timespec="seconds")
    except Exception:
        pass
    if is_cuda:
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_mem_gb=round(p.total_memory / 1e9, 1),
                    sms=p.multi_processor_count, cuda=torch.version.cuda)
        info["name"] = info["gpu"]
    else:
        info["name"] = f"{info['cpu']} ({os.cpu_count()} CPUs, {info.get('cpu_isa', '?')} kernels)"
    return info


machine = machine_info()
log(f"machine: {machine['name']} | {args.threads} threads | torch {machine['torch']} | vespo_ext "
    f"{machine['vespo_ext']} (git {machine['git']})" + (f" | CUDA {machine['cuda']}" if is_cuda else ""))
log(f"shape: T={T} V={V} logits {dtype_name} ({T * V * dtype.itemsize / MB:.1f} MB) | {S} sequences of {L} | "
    f"temperature {tau} | iters {iters} warmup {warmup}")

# -----------------------------------------------------------------------------
# Inputs: one packed batch, deterministic in --seed (the CPU memory workers rebuild it identically).
# Labels are half argmax ("confident" tokens), half uniform; old_logp is the current log-prob plus a
# little noise, so the importance weights W stay near 1 and phi is not ~0 (the check means something).

gen = torch.Generator(device=device).manual_seed(args.seed)
logits = torch.randn(T, V, generator=gen, device=device, dtype=dtype).mul_(2.0)  # no fp32 temporary
labels = torch.where(torch.rand(T, generator=gen, device=device) < 0.5, logits.argmax(-1),
                     torch.randint(0, V, (T,), generator=gen, device=device))
with torch.no_grad():  # current log-probs, in row chunks to stay small
    logp_now = torch.cat([torch.log_softmax(logits[i:i + 1024].float() / tau, -1).gather(
        -1, labels[i:i + 1024, None]).squeeze(-1) for i in range(0, T, 1024)])
old_logp = logp_now + 0.05 * torch.randn(T, generator=gen, device=device)
advantages = torch.randn(S, generator=gen, device=device)  # one per sequence, both signs
mask = torch.ones(T, dtype=torch.bool, device=device)  # every token counts (no skipped rows to flatter the kernel)
cu_seqlens = torch.arange(0, T + 1, L, device=device, dtype=torch.int64)
seq_id = torch.arange(S, device=device).repeat_interleave(L)  # eager's segment ids (the fused op reads cu_seqlens)
del logp_now
logits_bytes = logits.numel() * logits.element_size()
# The fewest bytes one fwd+bwd must move: the forward reads the logits, the backward reads them again
# and writes a gradient of the same size (3 logits buffers); divided by a time, an achieved bandwidth.
min_bytes = 3 * logits_bytes


def copy_bandwidth(n_bytes=4 * 2**30, reps=10):
    """Device-to-device copy rate (bytes read + written per second, median): the memory ceiling."""
    a = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    times = []
    for i in range(reps + 2):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(e0.elapsed_time(e1) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n_bytes / statistics.median(times)


def cpu_read_copy_ms(reps=7):
    """CPU: a plain read (sum) and a copy of one logits-sized buffer (median ms, the run's threads).
    One fwd+bwd must read the logits once (forward) and read + write them once (backward): the
    floor is read + copy."""
    a = torch.empty_like(logits).normal_() if logits.dtype.is_floating_point else logits.clone()
    b = torch.empty_like(a)
    b.copy_(a)  # first touch outside the timing
    # torch's CPU sum of bf16/fp16 runs far below the memory rate (1.3 GB/s measured): read the same
    # bytes as float32 words instead (22 GB/s; the values do not matter, only the bytes read)
    words = a.view(torch.float32) if a.element_size() == 2 and a.numel() % 2 == 0 and a.is_contiguous() else None
    rd, cp = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        a.sum(dtype=torch.float32) if words is None else words.sum()
        t1 = time.perf_counter()
        b.copy_(a)
        t2 = time.perf_counter()
        rd.append(t1 - t0)
        cp.append(t2 - t1)
    del a, b
    return statistics.median(rd) * 1e3, statistics.median(cp) * 1e3


if not is_cuda:
    machine["read_ms"], machine["copy_ms"] = cpu_read_copy_ms()
    machine["read_GBps"] = logits_bytes / (machine["read_ms"] / 1e3) / 1e9
    machine["copy_GBps"] = 2 * logits_bytes / (machine["copy_ms"] / 1e3) / 1e9
    machine["floor_ms"] = machine["read_ms"] + machine["copy_ms"]
    log(f"CPU, one logits buffer ({logits_bytes / 2**20:.0f} MiB): read {machine['read_ms']:.1f} ms "
        f"({machine['read_GBps']:.1f} GB/s), copy {machine['copy_ms']:.1f} ms ({machine['copy_GBps']:.1f} GB/s "
        f"read + write): fwd+bwd floor (read + copy) {machine['floor_ms']:.1f} ms")

if is_cuda:
    machine["copy_GBps"] = copy_bandwidth() / 1e9
    log(f"device-to-device copy: {machine['copy_GBps']:.0f} GB/s (read + write; the memory ceiling); "
        f"one fwd+bwd moves at least {min_bytes / 1e9:.2f} GB, so no version beats "
        f"{min_bytes / (machine['copy_GBps'] * 1e9) * 1e3:.2f} ms here")

# -----------------------------------------------------------------------------
# The implementations. Each variant is (prepare, loss_fn, grad_rows):
#   prepare()      -> the leaf tensor the gradient is taken for (untimed; a fresh clone for in-place)
#   loss_fn(x)     -> the scalar loss (forward); the backward is torch.autograd.grad(loss, x)
#   grad_rows(g, r) -> rows r of the gradient as (len(r), V), for the cross-checks


def packed_rows(g, r):
    return g[r]


def fused_fn(loss, grad_inplace):
    def fn(x):
        kw = dict(cu_seqlens=cu_seqlens, temperature=tau, grad_inplace=grad_inplace)
        if loss == "vespo":
            return vespo_ext.vespo_loss(x, labels, old_logp, advantages, mask, **kw)
        return vespo_ext.policy_loss(x, labels, old_logp, advantages, mask, loss=loss, **kw)
    return fn


def make_eager(loss, logp_impl, n_seq):
    """Plain PyTorch: fp32 per-token log-probs, then docs/spec.md's math on (T,) tensors, token-mean."""
    def fn(x, labels, old_logp, adv, mask, seq_id):
        z = x.float()  # no copy for fp32 logits
        if tau != 1.0:
            z = z / tau
        if logp_impl == "cross_entropy":
            logp = -F.cross_entropy(z, labels, reduction="none")
        else:
            logp = torch.log_softmax(z, -1).gather(-1, labels[:, None]).squeeze(-1)
        adv_tok = adv[seq_id]
        if loss == "vespo":
            log_ratio = torch.where(mask, torch.clamp(logp.detach() - old_logp, -20.0, 20.0), 0.0)
            s = torch.zeros(n_seq, dtype=torch.float32, device=x.device).index_add_(0, seq_id, log_ratio)
            W = torch.exp(torch.clamp(s, -20.0, 20.0))
            pos = adv >= 0
            k = torch.where(pos, K_POS, K_NEG)
            lam = torch.clamp(torch.where(pos, LAM_POS, LAM_NEG), min=1e-4)
            phi = torch.exp(lam + k * torch.log(torch.clamp(W, min=1e-8)) - lam * W)
            phi = torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)  # detached: built from logp.detach()
            per_tok = -phi[seq_id] * adv_tok * logp
        elif loss == "grpo":  # PPO-clip with dual clip
            ratio = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))
            pg1, pg2 = -adv_tok * ratio, -adv_tok * torch.clamp(ratio, 1 - EPS, 1 + EPS)
            clip1 = torch.maximum(pg1, pg2)
            per_tok = torch.where(adv_tok < 0, torch.minimum(-adv_tok * CLIP_C, clip1), clip1)
        else:  # gspo, sapo, cispo: the reference's sequence math (plain torch) on the eager log-probs
            return vespo_ext.reference.policy_loss_from_logp(logp, old_logp, adv, mask, loss=loss,
                                                             cu_seqlens=cu_seqlens, norm_len=float(T // n_seq))
        per_tok = torch.where(mask, per_tok, 0.0)
        return per_tok.sum() / torch.clamp(mask.sum(), min=1)
    return fn


def eager_variant(fn):
    return lambda x: fn(x, labels, old_logp, advantages, mask, seq_id)


def shared_leaf():
    return logits.detach().requires_grad_(True)  # the same storage every time, no copy


def cloned_leaf():
    return logits.detach().clone().requires_grad_(True)  # for variants that overwrite the logits


def liger_import():
    """Liger's logits-level fused GRPO-family loss (it has loss_type="vespo"), or the reason it is absent."""
    if not is_cuda:
        return None, "liger-kernel: CUDA only, skipped"
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
        return triton_grpo_loss, None
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "liger_kernel":
            return None, "liger-kernel not installed"
        return None, f"liger-kernel import failed: {e!r}"
    except Exception as e:  # a version mismatch with torch/triton/transformers
        return None, f"liger-kernel import failed: {e!r}"


def liger_variants(loss, triton_grpo_loss):
    """Liger takes padded logits (B, L+1, V) (the last position of each row is the shift and is not
    used), completion ids/mask/old logp (B, L), advantages (B,). beta=0 switches its KL term off.
    loss_type "vespo" is SPEC's VESPO with token-mean ("dapo" normaliser); for grpo we use "dapo"
    (token-mean PPO-clip); Liger has no dual clip (c=3), which never triggers on these inputs
    (ratios stay near 1). Liger computes phi from an extra no-grad read of the logits."""
    ids, old = labels.view(S, L), old_logp.view(S, L)
    cmask = mask.view(S, L).to(torch.int32)

    def prepare():
        xl = torch.zeros(S, L + 1, V, dtype=dtype, device=device)
        xl[:, :L] = logits.view(S, L, V)
        return xl.requires_grad_(True)

    def fn(inplace):
        def f(xl):
            out, _ = triton_grpo_loss(xl, old, None, ids, advantages, cmask, temperature=tau, beta=0.0, eps_low=EPS,
                                      eps_high=EPS, inplace=inplace, loss_type="vespo" if loss == "vespo" else "dapo",
                                      reduce=True)
            return out
        return f

    def rows(g, r):
        return g.reshape(S * (L + 1), V)[(r // L) * (L + 1) + r % L]

    label = "liger triton_grpo_loss"
    return {"liger": (label, prepare, fn(False), rows),
            "liger-inplace": (label + " inplace", prepare, fn(True), rows)}


def build_variants(loss, logp_impl, compiled_fn):
    v = {"fused": ("fused " + ("vespo_loss" if loss == "vespo" else "policy_loss"), shared_leaf,
                   fused_fn(loss, False), packed_rows),
         "fused-inplace": ("fused grad_inplace=True", cloned_leaf, fused_fn(loss, True), packed_rows),
         "eager": (f"eager ({logp_impl})", shared_leaf, eager_variant(make_eager(loss, logp_impl, S)), packed_rows)}
    if compiled_fn is not None:
        v["compiled"] = ("torch.compile(eager)", shared_leaf, eager_variant(compiled_fn), packed_rows)
    return v


# -----------------------------------------------------------------------------
# Measuring


def fwd_bwd(prepare, loss_fn):
    x = prepare()
    loss = loss_fn(x)
    (g,) = torch.autograd.grad(loss, x)
    return loss, g


def one_iteration(prepare, loss_fn):
    """(fwd ms, bwd ms, process CPU ms) of one forward+backward; prepare() runs before the clock
    starts. On CUDA: events around forward and backward in the stream (no sync in between); on CPU:
    perf_counter. The CPU time (all threads of this process) is a contention-robust companion to the
    wall time on a shared machine."""
    x = prepare()
    c0 = time.process_time()
    if is_cuda:
        e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        e0.record()
        loss = loss_fn(x)
        e1.record()
        (g,) = torch.autograd.grad(loss, x)
        e2.record()
        e2.synchronize()
        tf, tb = e0.elapsed_time(e1), e1.elapsed_time(e2)
    else:
        t0 = time.perf_counter()
        loss = loss_fn(x)
        t1 = time.perf_counter()
        (g,) = torch.autograd.grad(loss, x)
        t2 = time.perf_counter()
        tf, tb = 1e3 * (t1 - t0), 1e3 * (t2 - t1)
    cpu = 1e3 * (time.process_time() - c0)
    del x, loss, g
    return tf, tb, cpu


def time_variants(variants, n_iters, n_warmup):
    """Median fwd, bwd and fwd+bwd (ms) of each variant, {name: (prepare, loss_fn)}. The variants
    take turns, one iteration each per round, in an order that rotates every round, so that slow
    phases of a shared machine hit all of them alike rather than whichever ran at the time."""
    names = list(variants)
    samples = {n: [] for n in names}
    out = {}
    for i in range(n_warmup + n_iters):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            if n in out:  # failed earlier
                continue
            try:
                t = one_iteration(*variants[n])
            except Exception as e:  # e.g. out of memory on CUDA: report it, keep timing the others
                out[n] = {"error": "OOM" if "out of memory" in str(e).lower() else f"{type(e).__name__}: {str(e)[:300]}"}
                log(f"  {n}: {out[n]['error']}")
                if is_cuda:
                    gc.collect()
                    torch.cuda.empty_cache()
                continue
            if i >= n_warmup:
                samples[n].append(t)
    for n, ts in samples.items():
        if n in out:
            continue
        fwd, bwd, cpu = zip(*ts)
        tot = [f + b for f, b, _ in ts]
        out[n] = {"fwd_bwd_ms": statistics.median(tot), "fwd_ms": statistics.median(fwd),
                  "bwd_ms": statistics.median(bwd), "fwd_bwd_min_ms": min(tot), "cpu_ms": statistics.median(cpu),
                  "times_ms": [round(t, 3) for t in tot]}
    return out


def cuda_peak_extra(prepare, loss_fn):
    """torch.cuda.max_memory_allocated over one fwd+bwd, minus what was allocated before it (the
    inputs, including a cloned or padded logits copy made by prepare()). The gradient counts."""
    gc.collect()
    torch.cuda.empty_cache()
    x = prepare()
    sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = loss_fn(x)
    (g,) = torch.autograd.grad(loss, x)
    sync()
    extra = torch.cuda.max_memory_allocated() - base
    del x, loss, g
    return extra


# CPU memory. tracemalloc does not see torch's allocations, and torch's CPU allocator keeps no stats
# by default, so we use the kernel's own count of resident memory: each variant runs in a fresh
# subprocess (this script with --_mem-worker) that builds the same inputs, runs one warm-up
# fwd+bwd (compilation, thread start-up, lazy init), frees it and malloc_trim()s, then resets the
# resident-set high-water mark (writing 5 to /proc/self/clear_refs sets VmHWM to the current RSS)
# and runs one fwd+bwd, keeping the gradient alive. Peak extra = VmHWM after - VmRSS before. Buffers
# of this size are mmap'ed by glibc and unmapped when freed, so they cannot hide in a reused heap,
# and every byte of a gradient is written, so it is resident. The number also catches memory that
# the C++ kernels allocate themselves, which torch's allocator stats would not. vespo_ext's cached CPU
# gradient buffer is released before the baseline, so it is counted.
# If clear_refs is not writable, a thread samples VmRSS every 0.2 ms instead (marked "sampled").


def cpu_peak_extra_here(prepare, loss_fn):
    """Run inside the worker: returns (extra bytes, method)."""
    loss, g = fwd_bwd(prepare, loss_fn)  # warm-up
    del loss, g
    gc.collect()
    # vespo_ext keeps one CPU gradient buffer for reuse between steps: release it so that the
    # buffer counts as the extra memory it is (between steps it stays resident).
    vespo_ext.ops.clear_cpu_buffer_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    x = prepare()
    rss0 = status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM"
    except OSError:
        method = "sampled"
    if method == "VmHWM":
        loss = loss_fn(x)
        (g,) = torch.autograd.grad(loss, x)
        peak = status_kb("VmHWM")
    else:
        import threading
        stop, seen = threading.Event(), [rss0]

        def sample():
            while not stop.is_set():
                seen.append(status_kb("VmRSS"))
                time.sleep(0.0002)
        th = threading.Thread(target=sample, daemon=True)
        th.start()
        loss = loss_fn(x)
        (g,) = torch.autograd.grad(loss, x)
        seen.append(status_kb("VmRSS"))
        stop.set()
        th.join()
        peak = max(seen)
    return (peak - rss0) * 1024, method


def cpu_peak_extra(variant, loss, logp_impl):
    cmd = [sys.executable, os.path.abspath(__file__), "--device", "cpu", "--T", str(T), "--V", str(V), "--dtype",
           dtype_name, "--threads", str(args.threads), "--seqs", str(S), "--temperature", str(tau), "--seed",
           str(args.seed), "--losses", loss, "--_mem-worker", variant, "--_mem-loss", loss, "--_logp-impl", logp_impl]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    for ln in out.stdout.splitlines():
        if ln.startswith("MEM "):
            r = json.loads(ln[4:])
            return r["extra_bytes"], r["method"]
    raise RuntimeError(f"memory worker for {variant} failed (rc {out.returncode}): {out.stderr[-2000:]}")


def max_rel(a, b):
    """max |a - b| / max |b|, in fp32 (b is the reference)."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


# fp32 compute everywhere; the gradient is stored in the logits' dtype, so allow one rounding of it.
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
LOSS_TOL = 1e-4

# -----------------------------------------------------------------------------
# CPU memory worker: measure one variant and print one line


if worker:
    loss_name, logp_impl = args.mem_loss, args.logp_impl
    compiled = None
    if args.mem_worker == "compiled":
        compiled = torch.compile(make_eager(loss_name, logp_impl, S))
    _, prep, fn, _ = build_variants(loss_name, logp_impl, compiled)[args.mem_worker]
    extra, method = cpu_peak_extra_here(prep, fn)
    print("MEM " + json.dumps({"extra_bytes": extra, "method": method}), flush=True)
    sys.exit(0)

# -----------------------------------------------------------------------------
# Which eager formulation is faster here? Time both (vespo loss), keep the faster.

eager_choice = {impl: r["fwd_bwd_ms"] for impl, r in time_variants(
    {impl: (shared_leaf, eager_variant(make_eager("vespo", impl, S))) for impl in ("cross_entropy", "log_softmax_gather")},
    max(3, iters // 3), 1).items()}
logp_impl = min(eager_choice, key=eager_choice.get)
log("eager formulation: " + ", ".join(f"{k} {v:.1f} ms" for k, v in eager_choice.items()) + f" -> {logp_impl}")

triton_grpo_loss, liger_note = liger_import()
if liger_note:
    log(liger_note)
if is_cuda and triton_grpo_loss is not None:
    import liger_kernel
    log(f"liger-kernel {getattr(liger_kernel, '__version__', '?')}: liger_kernel.transformers.grpo_loss."
        "triton_grpo_loss (logits in; the chunked fused-linear LigerFusedLinearGRPOLoss also does the lm_head "
        "matmul, so it is not comparable and is not timed)")

results = {"machine": machine, "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "config": {"device": args.device, "T": T, "V": V, "dtype": dtype_name, "threads": args.threads,
                      "seqs": S, "seq_len": L, "temperature": tau, "iters": iters, "warmup": warmup,
                      "logits_mb": logits_bytes / MB, "seed": args.seed},
           "eager_formulation_ms": eager_choice, "eager_formulation": logp_impl,
           "liger": liger_note or "liger_kernel.transformers.grpo_loss.triton_grpo_loss", "note": args.note,
           "losses": {}}

check_failures = []
for loss_name in losses:
    log(f"\n== loss {loss_name} ==")
    res = {"variants": {}, "checks": {}}
    results["losses"][loss_name] = res

    # --- correctness: fused and eager vs the float64 reference ------------------------------------
    # The truth is vespo_ext.reference in float64 (same inputs, upcast). VESPO's weight is
    # exp(sum over a sequence of log-ratios), so fp32 log-prob errors add up along a sequence: on an
    # H200 at 2048 tokens per sequence, fp32 implementations (eager, torch.compile, Liger, fused)
    # differed from one another by 1e-4 to 3.5e-4 in the loss. Each is therefore measured against
    # float64, and the fused op must be within LOSS_TOL of it; eager's own error is reported (it aborts
    # the run only when it is 10x the tolerance: then the baseline itself is wrong).
    # On big CUDA shapes the float64 copy does not fit next to the rest, so the check runs on the
    # first sequences (<= 4096 tokens); every variant is also compared with the fused op at full size
    # (loss and 64 sampled gradient rows) during its first warm-up iteration below.
    n_chk = S if T * V * 4 <= 2**31 else max(1, 4096 // L)
    tc = n_chk * L
    sub = (logits[:tc], labels[:tc], old_logp[:tc], advantages[:n_chk], mask[:tc])
    xa = sub[0].detach().requires_grad_(True)
    kw = dict(cu_seqlens=cu_seqlens[:n_chk + 1], temperature=tau)
    la = vespo_ext.policy_loss(xa, *sub[1:], loss=loss_name, **kw)
    (ga,) = torch.autograd.grad(la, xa)
    xb = sub[0].detach().requires_grad_(True)
    lb = make_eager(loss_name, logp_impl, n_chk)(xb, *sub[1:], seq_id[:tc])
    (gb,) = torch.autograd.grad(lb, xb)
    xc = sub[0].detach().double().requires_grad_(True)
    lc = vespo_ext.reference.policy_loss(xc, sub[1], sub[2].double(), sub[3].double(), sub[4], loss=loss_name, **kw)
    (gc_,) = torch.autograd.grad(lc, xc)

    def rel(a, b):
        return abs(a.item() - b.item()) / max(abs(b.item()), 1e-30)
    chk = {"tokens": tc, "reference": "vespo_ext.reference in float64",
           "fused_vs_reference_loss": rel(la, lc), "fused_vs_reference_grad": max_rel(ga, gc_),
           "eager_vs_reference_loss": rel(lb, lc), "eager_vs_reference_grad": max_rel(gb, gc_),
           "fused_vs_eager_loss": rel(la, lb), "fused_vs_eager_grad": max_rel(ga, gb), "loss": lc.item()}
    res["checks"]["vs_reference_fp64"] = chk
    log(f"check on {tc} tokens: loss {la.item():.7g} (fused) {lb.item():.7g} (eager) {lc.item():.7g} (float64 "
        f"reference); rel. error vs float64: fused loss {chk['fused_vs_reference_loss']:.2e} grad "
        f"{chk['fused_vs_reference_grad']:.2e}, eager loss {chk['eager_vs_reference_loss']:.2e} grad "
        f"{chk['eager_vs_reference_grad']:.2e} (tolerance loss {LOSS_TOL:g}, grad {GRAD_TOL:g})")
    if chk["eager_vs_reference_loss"] > 10 * LOSS_TOL or chk["eager_vs_reference_grad"] > 10 * GRAD_TOL:
        sys.exit("ABORT: the eager baseline does not match vespo_ext.reference (float64)")
    if chk["fused_vs_reference_loss"] > LOSS_TOL or chk["fused_vs_reference_grad"] > GRAD_TOL:
        # Timed anyway (the numbers are recorded with the failed check), but the run exits non-zero.
        chk["passed"] = False
        check_failures.append(loss_name)
        log("CHECK FAILED: the fused op is not within the tolerances of the float64 reference; timing it anyway")
    else:
        chk["passed"] = True
    del xa, xb, xc, la, lb, lc, ga, gb, gc_, sub

    # --- the variants -------------------------------------------------------------------------
    compiled_fn, compile_note = None, None
    if args.no_compile:
        compile_note = "torch.compile skipped (--no-compile)"
    else:
        compiled_fn = torch.compile(make_eager(loss_name, logp_impl, S))
    variants = build_variants(loss_name, logp_impl, compiled_fn)
    if is_cuda and triton_grpo_loss is not None:
        variants.update(liger_variants(loss_name, triton_grpo_loss))
    rows = torch.randperm(T, generator=torch.Generator().manual_seed(1))[:64].to(device)
    ref = None  # the fused op's full-size loss and sampled gradient rows

    # first call of each (compiles where there is compiling to do), checked against the fused op
    for name, (label, prepare, loss_fn, grad_rows) in variants.items():
        r = res["variants"][name] = {"label": label}
        try:
            if is_cuda:
                gc.collect()
                torch.cuda.empty_cache()
            t_first = time.perf_counter()
            loss, g = fwd_bwd(prepare, loss_fn)
            r["first_call_s"] = time.perf_counter() - t_first
            lv, gr = loss.item(), grad_rows(g, rows).float()
            del loss, g
            if ref is None:
                ref = (lv, gr)
            else:
                r["vs_fused_loss"] = abs(lv - ref[0]) / max(abs(ref[0]), 1e-30)
                r["vs_fused_grad"] = max_rel(gr, ref[1])
                if r["vs_fused_loss"] > LOSS_TOL or r["vs_fused_grad"] > max(GRAD_TOL, 1e-3):
                    log(f"  WARNING: {name} differs from fused at full size: loss {r['vs_fused_loss']:.2e} "
                        f"grad {r['vs_fused_grad']:.2e}")
            log(f"  {name:14s} first call {r['first_call_s']:6.1f} s" + (
                f"; vs fused: loss {r['vs_fused_loss']:.1e} grad rows {r['vs_fused_grad']:.1e}" if "vs_fused_loss" in r else ""))
        except Exception as e:  # OOM, or torch.compile failing on this machine
            oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
            r["error"] = "OOM" if oom else f"{type(e).__name__}: {str(e)[:300]}"
            if name == "compiled":
                compile_note = f"torch.compile failed: {r['error']}"
            log(f"  {name}: {r['error']}")
            if name == "fused":
                raise
            if is_cuda:
                gc.collect()
                torch.cuda.empty_cache()
    ok = {n: v[1:3] for n, v in variants.items() if "error" not in res["variants"][n]}

    # timing, interleaved
    for name, t in time_variants(ok, iters, warmup).items():
        res["variants"][name].update(t)
        if "error" in t:
            del ok[name]

    # peak extra memory of one fwd+bwd each
    for name, (prepare, loss_fn) in ok.items():
        r = res["variants"][name]
        try:
            if is_cuda:
                extra, method = cuda_peak_extra(prepare, loss_fn), "cuda.max_memory_allocated"
            else:
                extra, method = cpu_peak_extra(name, loss_name, logp_impl)
            r.update(peak_extra_mb=extra / MB, x_logits=extra / logits_bytes, memory_method=method)
        except Exception as e:
            r["memory_error"] = "OOM" if "out of memory" in str(e).lower() else f"{type(e).__name__}: {str(e)[:300]}"
            log(f"  {name} memory: {r['memory_error']}")
            if is_cuda:
                gc.collect()
                torch.cuda.empty_cache()
    if compile_note:
        log(compile_note)
        res["compile_note"] = compile_note

    # --- the table ----------------------------------------------------------------------------
    eager_ms = res["variants"].get("eager", {}).get("fwd_bwd_ms")
    for r in res["variants"].values():
        if "fwd_bwd_ms" in r and eager_ms:
            r["speedup_vs_eager"] = eager_ms / r["fwd_bwd_ms"]
        if "fwd_bwd_ms" in r:  # the 3 logits buffers any version must move, over its time
            r["min_bytes_GBps"] = min_bytes / (r["fwd_bwd_ms"] / 1e3) / 1e9
    hdr = f"{'variant':34s} | {'fwd+bwd ms':>10s} | {'speedup vs eager':>16s} | {'peak extra MB':>13s} | {'x logits':>8s} | {'GB/s*':>7s}"
    print(f"\n{loss_name} | {machine['name']} | {args.threads} threads | T={T} V={V} {dtype_name} | "
          f"logits {logits_bytes / MB:.1f} MB")
    print(hdr)
    print("-" * len(hdr))
    for name, r in res["variants"].items():
        if "error" in r:
            print(f"{r['label']:34s} | {r['error'][:10]:>10s} |")
            continue
        sp = f"{r['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in r else "-"
        mem = f"{r['peak_extra_mb']:13.1f} | {r['x_logits']:8.2f}" if "peak_extra_mb" in r else f"{'-':>13s} | {'-':>8s}"
        bw = f" | {r['min_bytes_GBps']:7.0f}" + (f" ({r['min_bytes_GBps'] / machine['copy_GBps']:.0%} of copy)"
                                                 if machine.get("copy_GBps") else "")
        print(f"{r['label']:34s} | {r['fwd_bwd_ms']:10.2f} | {sp:>16s} | {mem}{bw}")
    print("* GB/s: 3 logits buffers (fwd read, bwd read, grad write) over the fwd+bwd time")
    if machine.get("floor_ms"):
        f_ms = res["variants"].get("fused", {}).get("fwd_bwd_ms")
        print(f"CPU read {machine['read_GBps']:.1f} GB/s, copy {machine['copy_GBps']:.1f} GB/s (read + write), measured "
              f"now: floor read + copy = {machine['floor_ms']:.2f} ms"
              + (f"; fused {f_ms:.1f} ms = {f_ms / machine['floor_ms']:.2f}x the floor" if f_ms else ""))
    print("\nforward / backward alone (ms, medians), fastest fwd+bwd, process CPU time per fwd+bwd:")
    for name, r in res["variants"].items():
        if "fwd_ms" in r:
            print(f"  {r['label']:34s} fwd {r['fwd_ms']:9.2f}   bwd {r['bwd_ms']:9.2f}   min {r['fwd_bwd_min_ms']:9.2f}"
                  f"   cpu {r['cpu_ms']:9.1f}")

    # --- the targets --------------------------------------------------------------------
    v = res["variants"]
    tg = {}
    f = v.get("fused", {})
    if "speedup_vs_eager" in f:
        if is_cuda:
            tg["fused >= 12x eager"] = (f["speedup_vs_eager"], f["speedup_vs_eager"] >= 12)
            on_h100 = "H100" in machine.get("gpu", "")
            is_ref_shape = (T, V, dtype_name) == (32768, 151936, "bf16")
            tg["fused <= 11.5 ms (H100, T=32768 V=151936 bf16)"] = (
                f["fwd_bwd_ms"], f["fwd_bwd_ms"] <= 11.5 if on_h100 and is_ref_shape else None)
            for a, b in (("fused", "liger"), ("fused-inplace", "liger-inplace")):
                if "fwd_bwd_ms" in v.get(a, {}) and "fwd_bwd_ms" in v.get(b, {}):
                    s = v[b]["fwd_bwd_ms"] / v[a]["fwd_bwd_ms"]
                    tg[f"{a} >= 1.3x {b}"] = (s, s >= 1.3)
        else:
            tg["fused >= 4x eager"] = (f["speedup_vs_eager"], f["speedup_vs_eager"] >= 4)
            if "x_logits" in f:
                tg["fused peak extra <= 1 logits buffer"] = (f["x_logits"], f["x_logits"] <= 1.02)
    res["targets"] = {k: {"value": val, "met": met} for k, (val, met) in tg.items()}
    if tg:
        print("\ntargets:")
        for k, (val, met) in tg.items():
            print(f"  {k:48s} {val:8.2f}  {'met' if met else ('MISSED' if met is not None else 'n/a here')}")

try:
    machine["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
except OSError:
    pass
if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(results, fh, indent=2)
    print(f"\nwrote {args.json}")
if check_failures:
    sys.exit(f"CHECK FAILED for {', '.join(check_failures)}: the fused op does not match eager (see above)")
