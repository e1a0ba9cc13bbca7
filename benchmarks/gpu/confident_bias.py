"""The per-token bias of token_logprobs on confident rows, as numbers (tests/test_confident_rows.py only
passes or fails): rows of V = 151936 with p_label uniform in [0.5, 0.999] (that test's recipe), fp32 and
bf16, against float64; beside it the same for torch's own log_softmax in fp32. On CUDA once per kernel
generation of --kernels (in this process, vespo_ext._cuda.set_kernel_variant: v1, v2 = software exp2,
v2-mufu = ex2.approx, v2-split = ex2.approx on a split argument), so the log holds the A/B's accuracy
side by side.

    python benchmarks/gpu/confident_bias.py [--device cuda] [--T 4096] [--kernels v1,v2,v2-mufu,v2-split]

Budget (issue 18): |mean signed error| <= 1e-8 per token; the max |error| is only rounding.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "tests"))
from test_confident_rows import confident_batch, ref_logp  # noqa: E402  (the test's row recipe, one copy)

import vespo_ext  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--kernels", default="v1,v2,v2-mufu,v2-split", help="CUDA kernel generations, comma list")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda":
        from vespo_ext import _cuda

        kernels, set_kernels = args.kernels.split(","), _cuda.set_kernel_variant
    else:
        kernels, set_kernels = ["cpu"], (lambda name: None)
    try:
        from vespo_ext import _build_info as b
        exp = getattr(b, "cuda_fwd_exp", "?")
    except ImportError:
        exp = "? (no _build_info)"
    print(f"confident rows: T={args.T} V=151936 p_label in [0.5, 0.999], device {dev}, v1 forward exp {exp}")
    print(f"{'dtype':8s} {'what':32s} {'mean signed err':>16s} {'max |err|':>10s} {'x 2048 tokens':>14s}")
    bad = 0
    for dtype in (torch.float32, torch.bfloat16):
        logits, labels, _ = confident_batch(args.T, dtype, dev)
        ref = ref_logp(logits, labels)
        rows = []
        for k in kernels:
            set_kernels(k)
            rows.append((f"token_logprobs {k}", vespo_ext.token_logprobs(logits, labels).double()))
        set_kernels(None)
        if dtype == torch.float32:
            eager = torch.cat([torch.log_softmax(logits[c:c + 512], -1).gather(1, labels[c:c + 512, None])[:, 0]
                               for c in range(0, args.T, 512)])
            rows.append(("torch log_softmax fp32", eager.double()))
        for what, got in rows:
            err = got - ref
            m, mx = float(err.mean()), float(err.abs().max())
            flag = "" if abs(m) <= 1e-8 or what.startswith("torch") else "  OVER 1e-8"
            bad += bool(flag)
            print(f"{str(dtype).replace('torch.', ''):8s} {what:32s} {m:16.3e} {mx:10.2e} {m * 2048:14.3e}{flag}")
        del logits
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
