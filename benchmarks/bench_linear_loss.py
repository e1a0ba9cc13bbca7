"""
Benchmark the fused linear head + VESPO loss (vespo_ext.linear_policy_loss) side by side, in one run,
same inputs, same thread count:

  fused-linear      vespo_ext.linear_policy_loss(hidden, weight, ...): token chunks, no T x V tensor
  fused-linear@N    the same with chunk_tokens=N (any number of them, e.g. a sweep of chunk sizes in one run)
  matmul+op         logits = hidden @ weight.T, then vespo_ext.vespo_loss(logits, ...) (gradient into a
                    new (T, V) buffer, the op's default)
  matmul+op-inplace the same with grad_inplace=True (the gradient overwrites the logits)
  eager             logits = hidden @ weight.T, log-probs by -cross_entropy(reduction="none") in fp32,
                    then vespo_ext.reference.policy_loss_from_logp (pure torch)
  liger             liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss(loss_type="vespo", beta=0): Liger's
                    chunked fused-linear loss (pure torch, runs on CPU), padded (B, L, H), one sequence per
                    chunk (its default chunk_size=1), compiled=False on CPU (True on CUDA)

Every variant computes the VESPO token-mean loss of S equal-length sequences and the gradients w.r.t.
hidden and weight. Reported: fwd+bwd time (median over --iters; the variants take turns every
iteration so that a shared machine's noise hits them alike) and peak extra memory of one fwd+bwd
(beyond the inputs), counted two ways, the same way for every variant:

  peak extra           everything alive at the worst moment, the returned hidden and weight gradients
                       included while they exist (the process's real high-water mark)
  peak w/o grads       the worst moment of everything else: at each moment the returned gradients' own
                       buffers (the tensors that end up in hidden.grad / weight.grad) are not counted

The two differ by when each variant's peak happens: the fused op allocates its gradients first and
holds them throughout (its peak contains them), `matmul` + op peaks in the op's backward, before the
matmul's backward allocates them (its peak does not). Subtracting the gradients' size from every
variant's peak (this script's old "transient" column) charged the unfused paths for gradients their
peak never held.

Memory, CPU: torch's CPU allocator keeps no statistics and tracemalloc does not see torch's allocations,
so each variant runs in a fresh subprocess (this script with --_mem-worker) that builds the same inputs,
runs one warm-up fwd+bwd, frees it, malloc_trim()s, resets the resident-set high-water mark (writing 5
to /proc/self/clear_refs sets VmHWM to the current RSS) and runs one fwd+bwd keeping the gradients:
peak extra = VmHWM - VmRSS before (every byte of every buffer is written, so it is resident).
CUDA: torch.cuda.max_memory_allocated over one fwd+bwd minus what was allocated before it.
Peak w/o grads (both devices): one more fwd+bwd under torch.profiler(profile_memory=True), whose
allocation events (address, bytes, time) give torch's live bytes over time; the allocations whose
address ends up as hidden.grad / weight.grad are left out from their allocation on. It sees only
torch's allocations (not a BLAS's private workspace), so its inclusive peak ("profiled peak") is
reported too, next to the high-water mark.

    python benchmarks/bench_linear_loss.py                   # CUDA if there is one, else CPU (issue 13's configs)
    python benchmarks/bench_linear_loss.py --tiny            # seconds: a CI smoke run
    python benchmarks/bench_linear_loss.py --json benchmarks/results/linear_cpu.json --note "..."
"""
import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import vespo_ext
from vespo_ext import reference as R
from host_info import host_info, status_kb  # benchmarks/host_info.py, a sibling module

parser = argparse.ArgumentParser(description="fused linear + VESPO loss vs matmul + op / eager / Liger")
parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--T", type=int, default=None, help="tokens (default: CPU 2048, CUDA 32768)")
parser.add_argument("--seqs", type=int, default=16, help="equal-length sequences the T tokens are split into")
parser.add_argument("--H", type=int, default=None, help="hidden size (default: CPU 512, CUDA 4096)")
parser.add_argument("--V", type=int, default=None, help="vocabulary (default: CPU 32768, CUDA 151936)")
parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default: CPU fp32, CUDA bf16")
parser.add_argument("--threads", type=int, default=2, help="CPU threads, all variants")
parser.add_argument("--iters", type=int, default=None, help="timed iterations per variant (CPU 5, CUDA 10)")
parser.add_argument("--warmup", type=int, default=1, help="untimed iterations per variant first")
parser.add_argument("--chunk-tokens", type=int, default=None, help="fused-linear chunk_tokens (default: the op's)")
parser.add_argument("--variants", default="fused-linear,matmul+op,matmul+op-inplace,eager,liger")
parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
parser.add_argument("--tiny", action="store_true", help="T=64 as 4 x 16, H=32, V=512, 2 iterations: smoke run")
parser.add_argument("--json", default=None, metavar="PATH")
parser.add_argument("--note", default=None)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--_mem-worker", dest="mem_worker", default=None, help=argparse.SUPPRESS)
args = parser.parse_args()

device = torch.device(args.device)
is_cuda = device.type == "cuda"
if args.tiny:
    args.T, args.seqs, args.H, args.V = args.T or 64, 4, args.H or 32, args.V or 512
    args.iters = args.iters or 2
T = args.T or (32768 if is_cuda else 2048)
H = args.H or (4096 if is_cuda else 512)
V = args.V or (151936 if is_cuda else 32768)
S = args.seqs
if T % S:
    sys.exit(f"--T {T} must be a multiple of --seqs {S}")
L = T // S
dtype_name = args.dtype or ("bf16" if is_cuda else "fp32")
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
iters = args.iters or (10 if is_cuda else 5)
torch.set_num_threads(args.threads)
MB = 1e6


def log(msg):
    if args.mem_worker is None:
        print(msg, flush=True)


# -----------------------------------------------------------------------------
# Inputs: one batch of S sequences of L tokens, deterministic in --seed (the memory workers rebuild it).
def make_inputs():
    if is_cuda:
        return make_inputs_cuda()
    g = torch.Generator().manual_seed(args.seed)
    hidden = torch.randn(T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * (2.0 / H ** 0.5)).to(dtype)
    labels = torch.randint(0, V, (T,), generator=g)
    with torch.no_grad():
        z = (hidden.float() @ weight.float().t())
        lp = z.gather(1, labels[:, None])[:, 0] - torch.logsumexp(z, 1)
        del z
    old = lp + 0.3 * torch.randn(T, generator=g) / L ** 0.5
    adv = torch.randn(S, generator=g)
    mask = torch.rand(T, generator=g) < 0.95
    mask.view(S, L)[:, 0] = True
    cu = torch.arange(S + 1, dtype=torch.int64) * L
    d = dict(hidden=hidden, weight=weight, labels=labels, old=old, adv=adv, mask=mask, cu=cu)
    return {k: v.to(device) for k, v in d.items()}


def make_inputs_cuda(rows=4096):
    """The same recipe on the GPU (its own generator: other values than the CPU's for a seed): at T=32768,
    H=4096, V=151936 the CPU recipe would build 20 GB of fp32 logits and multiply 2e13 FLOP on the host;
    here the old log-probs come from `rows` rows of fp32 logits at a time."""
    g = torch.Generator(device).manual_seed(args.seed)
    hidden = torch.randn(T, H, generator=g, device=device).to(dtype)
    weight = (torch.randn(V, H, generator=g, device=device) * (2.0 / H ** 0.5)).to(dtype)
    labels = torch.randint(0, V, (T,), generator=g, device=device)
    lp = torch.empty(T, device=device)
    wf = weight.float()
    with torch.no_grad():
        for r0 in range(0, T, rows):
            z = hidden[r0:r0 + rows].float() @ wf.t()
            lp[r0:r0 + rows] = z.gather(1, labels[r0:r0 + rows, None])[:, 0] - torch.logsumexp(z, 1)
            del z
    del wf
    old = lp + 0.3 * torch.randn(T, generator=g, device=device) / L ** 0.5
    adv = torch.randn(S, generator=g, device=device)
    mask = torch.rand(T, generator=g, device=device) < 0.95
    mask.view(S, L)[:, 0] = True
    cu = torch.arange(S + 1, dtype=torch.int64, device=device) * L
    return dict(hidden=hidden, weight=weight, labels=labels, old=old, adv=adv, mask=mask, cu=cu)


def build_variants(x):
    """name -> fn(hidden, weight) -> loss (hidden and weight are leaves requiring grad)."""
    lab, old, adv, mask, cu = x["labels"], x["old"], x["adv"], x["mask"], x["cu"]
    out = {}

    def fused_with(chunk):
        def f(h, w):
            return vespo_ext.linear_policy_loss(h, w, lab, old, adv, mask, cu_seqlens=cu, chunk_tokens=chunk)
        return f

    fused = fused_with(args.chunk_tokens)

    def unfused(inplace):
        def f(h, w):
            return vespo_ext.vespo_loss(h @ w.t(), lab, old, adv, mask, cu_seqlens=cu, grad_inplace=inplace)
        return f

    def eager(h, w):
        logits = h @ w.t()
        lp = -F.cross_entropy(logits.float(), torch.where(mask, lab, 0), reduction="none")
        return R.policy_loss_from_logp(lp, old, adv, mask, cu_seqlens=cu, agg="token-mean")

    out["fused-linear"], out["matmul+op"], out["matmul+op-inplace"], out["eager"] = (
        fused, unfused(False), unfused(True), eager)
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    for n in wanted:
        if n.startswith("fused-linear@"):
            tail = n[len("fused-linear@"):]
            if not tail.isdigit() or int(tail) < 1:
                sys.exit(f"--variants: {n!r} needs a positive chunk size after '@' (e.g. fused-linear@1024)")
            out[n] = fused_with(int(tail))
    unknown = [n for n in wanted if n not in out and n != "liger"]
    if unknown:
        sys.exit(f"--variants: unknown {', '.join(unknown)} (known: fused-linear[@N], matmul+op, matmul+op-inplace, "
                 "eager, liger)")
    try:
        if "liger" not in wanted:
            raise LookupError("not asked for")
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger = LigerFusedLinearGRPOLoss(beta=0.0, loss_type="vespo", use_ref_model=False, compiled=is_cuda)
        lab2, old2, mask2 = lab.view(S, L), old.view(S, L), mask.view(S, L).to(torch.int64)

        def liger_fn(h, w):
            res = liger(h.view(S, L, H), w, lab2, mask2, adv, old_per_token_logps=old2)
            return res[0] if isinstance(res, tuple) else res

        out["liger"] = liger_fn
    except LookupError:
        pass
    except Exception as e:  # not installed / no CPU path in this version
        log(f"liger: unavailable ({type(e).__name__}: {e})")
    return {k: out[k] for k in wanted if k in out}


def leaves(x):
    return x["hidden"].clone().requires_grad_(True), x["weight"].clone().requires_grad_(True)


def sync():
    if is_cuda:
        torch.cuda.synchronize()


def fwd_bwd(fn, h, w):
    h.grad = w.grad = None
    loss = fn(h, w)
    loss.backward()
    return loss.detach()


# -----------------------------------------------------------------------------
# Memory
def profiled_peaks(fn, h, w):
    """(peak, peak without the returned gradients) of torch's live bytes over one fwd+bwd, from the profiler's
    allocation events; the returned gradients are the allocations whose address hidden.grad / weight.grad
    hold at the end (counted from that allocation on)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if is_cuda else [])
    h.grad = w.grad = None
    gc.collect()
    vespo_ext.ops.clear_cpu_buffer_cache()  # as before the high-water-mark run: its buffer is allocated in view
    with profile(activities=acts, profile_memory=True) as prof:
        fwd_bwd(fn, h, w)
        sync()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    dev_type = 1 if is_cuda else 0  # c10::DeviceType CPU / CUDA
    mem = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == dev_type),
                 key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))
    grad_ptrs = {t.grad.data_ptr() for t in (h, w) if t.grad is not None}
    last_alloc = {}  # address -> index of its last allocation event
    for i, e in enumerate(mem):
        if e["args"]["Bytes"] > 0:
            last_alloc[e["args"]["Addr"]] = i
    grad_events = {last_alloc[p] for p in grad_ptrs if p in last_alloc}
    live = grads = peak = peak_wo = 0
    for i, e in enumerate(mem):
        live += e["args"]["Bytes"]
        if i in grad_events:
            grads += e["args"]["Bytes"]
        peak, peak_wo = max(peak, live), max(peak_wo, live - grads)
    return peak, peak_wo, len(grad_events) == len(grad_ptrs)


def memory_here(name, x=None):
    """Peak extra bytes of one fwd+bwd of `name` (in this process; `x`: the inputs, when already built), the
    method, and the profiled peaks."""
    x = make_inputs() if x is None else x
    fn = build_variants(x)[name]
    h, w = leaves(x)
    fwd_bwd(fn, h, w)  # warm-up: lazy init, thread pools, compilation
    h.grad = w.grad = None
    gc.collect()
    vespo_ext.ops.clear_cpu_buffer_cache()
    if is_cuda:
        sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd(fn, h, w)
        sync()
        extra, method = torch.cuda.max_memory_allocated() - base, "cuda.max_memory_allocated"
    else:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        rss0 = status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        fwd_bwd(fn, h, w)
        extra, method = (status_kb("VmHWM") - rss0) * 1024, "VmHWM (fresh subprocess)"
    try:
        prof = profiled_peaks(fn, h, w)
    except Exception as e:  # noqa: BLE001 - a torch whose profiler has no memory events: the high-water mark only
        log(f"{name}: profiled memory unavailable ({type(e).__name__}: {e})")
        prof = None
    return extra, method, prof


def memory(name, x=None):
    if is_cuda:  # in this process, on the inputs of the timing (the caching allocator's statistics)
        return memory_here(name, x)
    cmd = [sys.executable, os.path.abspath(__file__), "--device", "cpu", "--T", str(T), "--seqs", str(S), "--H", str(H),
           "--V", str(V), "--dtype", dtype_name, "--threads", str(args.threads), "--seed", str(args.seed),
           "--variants", name, "--_mem-worker", name]
    if args.chunk_tokens:
        cmd += ["--chunk-tokens", str(args.chunk_tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    for ln in out.stdout.splitlines():
        if ln.startswith("MEM "):
            r = json.loads(ln[4:])
            return r["extra_bytes"], r["method"], r["profiled"]
    raise RuntimeError(f"memory worker for {name} failed (rc {out.returncode}): {out.stderr[-2000:]}")


if args.mem_worker is not None:
    extra, method, prof = memory_here(args.mem_worker)
    print("MEM " + json.dumps({"extra_bytes": extra, "method": method, "profiled": prof}), flush=True)
    sys.exit(0)


# -----------------------------------------------------------------------------
def machine_info():
    info = host_info(torch.__version__, args.threads)
    try:
        import liger_kernel  # noqa: F401
        from importlib.metadata import version
        info["liger_kernel"] = version("liger-kernel")
    except Exception:
        info["liger_kernel"] = None
    if is_cuda:
        info["gpu"] = torch.cuda.get_device_name(device)
    info["name"] = info.get("gpu") or f"{info['cpu']} ({os.cpu_count()} CPUs)"
    return info


def main():
    machine = machine_info()
    chunk = args.chunk_tokens or vespo_ext.linear.default_chunk_tokens(V, dtype, device)
    log(f"machine: {machine['name']} | {args.threads} threads | torch {machine['torch']} | git {machine['git']} | "
        f"liger-kernel {machine['liger_kernel']}")
    log(f"shape: T={T} ({S} x {L}) H={H} V={V} {dtype_name} | logits would be {T * V * dtype.itemsize / MB:.0f} MB | "
        f"fused chunk_tokens={chunk} | iters {iters} (+{args.warmup} warm-up)")
    x = make_inputs()
    variants = build_variants(x)
    names = list(variants)
    params = {n: leaves(x) for n in names}
    results = {n: {"times_ms": []} for n in names}
    for n in names:
        for _ in range(args.warmup):
            fwd_bwd(variants[n], *params[n])
    for it in range(iters):
        for n in (names if it % 2 == 0 else names[::-1]):
            h, w = params[n]
            sync()
            t0 = time.perf_counter()
            loss = fwd_bwd(variants[n], h, w)
            sync()
            results[n]["times_ms"].append((time.perf_counter() - t0) * 1e3)
            results[n]["loss"] = float(loss)
    ref = params.get("matmul+op") or params[names[0]]
    for n in names:
        r = results[n]
        r["fwd_bwd_ms"] = statistics.median(r["times_ms"])
        r["fwd_bwd_min_ms"] = min(r["times_ms"])  # the least disturbed iteration (a shared machine)
        h, w = params[n]
        r["grad_hidden_max_rel_diff_vs_matmul+op"] = float((h.grad.float() - ref[0].grad.float()).abs().max()
                                                           / ref[0].grad.float().abs().max())
        r["grad_weight_max_rel_diff_vs_matmul+op"] = float((w.grad.float() - ref[1].grad.float()).abs().max()
                                                           / ref[1].grad.float().abs().max())
    del params
    gc.collect()
    grads_bytes = (T * H + V * H) * dtype.itemsize
    if not args.no_memory:
        for n in names:
            try:
                extra, method, prof = memory(n, x)
                results[n].update(peak_extra_mb=extra / MB, memory_method=method)
                if prof is not None:
                    results[n].update(profiled_peak_mb=prof[0] / MB, peak_wo_grads_mb=prof[1] / MB,
                                      profiled_grads_found=prof[2])
            except Exception as e:
                results[n]["memory_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    base = results.get("matmul+op", results[names[0]])

    def col(r, key):
        if key not in r or key not in base:
            return f"{'-':>13s} | {'-':>8s}"
        return f"{r[key]:13.1f} | {r[key] / base[key]:7.3f}x"

    print(f"\n{'variant':18s} | {'fwd+bwd ms':>10s} | {'min ms':>8s} | {'vs matmul+op':>12s} | "
          f"{'peak extra MB':>13s} | {'vs m+op':>8s} | {'w/o grads MB':>13s} | {'vs m+op':>8s} | "
          f"{'profiled MB':>11s} | loss")
    for n in names:
        r = results[n]
        prof = f"{r['profiled_peak_mb']:11.1f}" if "profiled_peak_mb" in r else f"{'-':>11s}"
        print(f"{n:18s} | {r['fwd_bwd_ms']:10.1f} | {r['fwd_bwd_min_ms']:8.1f} | "
              f"{r['fwd_bwd_ms'] / base['fwd_bwd_ms']:11.3f}x | {col(r, 'peak_extra_mb')} | "
              f"{col(r, 'peak_wo_grads_mb')} | {prof} | {r['loss']:.6g}")
    if "fused-linear" in results and "liger" in results:
        f, lg = results["fused-linear"], results["liger"]
        print(f"\nfused-linear vs liger: {lg['fwd_bwd_ms'] / f['fwd_bwd_ms']:.2f}x faster"
              + (f", {f['peak_extra_mb'] / lg['peak_extra_mb']:.2f}x its memory" if "peak_extra_mb" in f
                 and "peak_extra_mb" in lg else ""))
    print(f"(the hidden and weight gradients every variant returns: {grads_bytes / MB:.1f} MB; 'peak extra' counts "
          "them while they exist, 'w/o grads' never; 'profiled' = torch's allocations only, grads included)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "note": args.note,
                       "config": {"T": T, "seqs": S, "L": L, "H": H, "V": V, "dtype": dtype_name, "iters": iters,
                                  "warmup": args.warmup, "chunk_tokens": chunk, "loss": "vespo token-mean"},
                       "grads_bytes": grads_bytes, "results": results}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
