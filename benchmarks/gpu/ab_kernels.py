"""A/B of the CUDA log-prob kernel generations in ONE process (vespo_ext._cuda.set_kernel_variant: no
rebuild, no CUDA re-initialisation per variant): v1 (the default), v2 (software exp2), v2-mufu (ex2.approx)
and v2-split (ex2.approx on a 1/256-split argument), timed in turns on the same inputs.

Per variant: the fused VESPO loss forward (logprob_fwd + seq_reduce, no grad), forward + backward with a
new gradient, and forward + backward with grad_inplace=True; the backward alone is their difference.
Beside them the device-to-device copy rate and the floor of three logits passes (read, read, write) at
that rate. Also checks that every variant gives v1's loss and gradient (a few rows) within the budgets.

    python benchmarks/gpu/ab_kernels.py [--T 32768] [--V 151936] [--dtype bf16] [--json PATH]
    python benchmarks/gpu/ab_kernels.py --device cpu --T 64 --V 1000   # rehearsal: the CPU kernels only
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

import vespo_ext

VARIANTS = ("v1", "v2", "v2-mufu", "v2-split")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--T", type=int, default=32768)
    ap.add_argument("--V", type=int, default=151936)
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="bf16")
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--iters", type=int, default=5, help="timed rounds (each variant once per round)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    T, V, S = args.T, args.V, args.seqs
    cuda = dev.type == "cuda"
    if cuda:
        from vespo_ext import _cuda

        variants = args.variants.split(",")
        set_variant = _cuda.set_kernel_variant
    else:  # the rehearsal: the CPU kernels under one name, to exercise this script's logic
        variants, set_variant = ["cpu"], (lambda name: None)

    gen = torch.Generator(device=dev).manual_seed(0)
    logits = torch.randn(T, V, generator=gen, device=dev, dtype=dtype).mul_(2.0)
    labels = torch.where(torch.rand(T, generator=gen, device=dev) < 0.5, logits.argmax(-1),
                         torch.randint(0, V, (T,), generator=gen, device=dev))
    old_logp = vespo_ext.token_logprobs(logits, labels) + 0.05 * torch.randn(T, generator=gen, device=dev)
    adv = torch.randn(S, generator=gen, device=dev)
    cu = (torch.arange(S + 1, dtype=torch.int64) * T // S).to(dev)
    kw = dict(cu_seqlens=cu)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(fn):
        sync()
        if cuda:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            torch.cuda.synchronize()
            return e0.elapsed_time(e1)
        import time
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def fwd():
        with torch.no_grad():
            return vespo_ext.vespo_loss(logits, labels, old_logp, adv, **kw)

    def fwd_bwd():
        x = logits.detach().requires_grad_(True)
        vespo_ext.vespo_loss(x, labels, old_logp, adv, **kw).backward()
        return x.grad

    spare = logits.clone()

    def fwd_bwd_inplace():
        x = spare.requires_grad_(True)
        vespo_ext.vespo_loss(x, labels, old_logp, adv, grad_inplace=True, **kw).backward()
        x.grad = None
        spare.requires_grad_(False)

    # Correctness across variants (against v1 or the first variant): loss and a few gradient rows.
    rows = torch.linspace(0, T - 1, 8, device=dev).long()
    ref = None
    check = {}
    for v in variants:
        set_variant(v)
        loss = float(fwd())
        g = fwd_bwd()[rows].double()
        if ref is None:
            ref = (loss, g)
        dl = abs(loss - ref[0]) / max(abs(ref[0]), 1e-30)
        dg = float((g - ref[1]).abs().max() / ref[1].abs().max().clamp_min(1e-30))
        check[v] = {"loss": loss, "loss_rel_diff_vs_first": dl, "grad_rel_diff_vs_first": dg}
        print(f"{v:9s} loss {loss:+.8e}  |dloss|/loss vs {variants[0]} {dl:.2e}  max|dgrad|/max|grad| {dg:.2e}")
        del g

    # Timing: each round runs every variant once (turns, so drifts in clock or temperature spread evenly).
    times = {v: {"fwd": [], "fwd_bwd": [], "fwd_bwd_inplace": []} for v in variants}
    for r in range(args.iters + 1):
        for v in variants:
            set_variant(v)
            t_f = timed(fwd)
            t_fb = timed(fwd_bwd)
            spare.copy_(logits)
            t_in = timed(fwd_bwd_inplace)
            if r > 0:  # round 0 warms up
                times[v]["fwd"].append(t_f)
                times[v]["fwd_bwd"].append(t_fb)
                times[v]["fwd_bwd_inplace"].append(t_in)
    set_variant(None)

    nbytes = logits.numel() * logits.element_size()
    copy_ms = statistics.median(timed(lambda: spare.copy_(logits)) for _ in range(5))
    copy_rate = 2 * nbytes / (copy_ms / 1e3)
    floor_ms = 3 * nbytes / copy_rate * 1e3
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"\n{name}: T={T} V={V} {args.dtype}, median of {args.iters}; copy {copy_rate / 1e12:.2f} TB/s, "
          f"floor of 3 passes {floor_ms:.2f} ms")
    print(f"{'variant':9s} {'fwd ms':>8s} {'TB/s':>6s} {'bwd ms':>8s} {'TB/s':>6s} {'fwd+bwd':>8s} {'inplace':>8s} "
          f"{'vs v1':>6s} {'floor/x':>7s}")
    out = {"device": name, "T": T, "V": V, "dtype": args.dtype, "copy_TBps": copy_rate / 1e12, "floor_ms": floor_ms,
           "check": check, "variants": {}}
    base = None
    for v in variants:
        med = {k: statistics.median(x) for k, x in times[v].items()}
        bwd = med["fwd_bwd"] - med["fwd"]
        base = base or med["fwd_bwd"]
        out["variants"][v] = dict(med, bwd=bwd, samples=times[v])
        print(f"{v:9s} {med['fwd']:8.3f} {nbytes / med['fwd'] / 1e9:6.2f} {bwd:8.3f} {2 * nbytes / bwd / 1e9:6.2f} "
              f"{med['fwd_bwd']:8.3f} {med['fwd_bwd_inplace']:8.3f} {base / med['fwd_bwd']:6.3f} "
              f"{floor_ms / med['fwd_bwd']:7.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    bad = [v for v, c in check.items() if c["loss_rel_diff_vs_first"] > 2e-4 or c["grad_rel_diff_vs_first"] > 1e-2]
    if bad:
        print(f"variants disagree with {variants[0]} beyond the budgets (loss 2e-4, grad 1e-2): {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
