"""
A small, fast smoke test of the fused kernels, meant to run under compute-sanitizer:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
        python tests/cuda_smoke.py

(without torch's caching allocator every tensor is its own cudaMalloc, so an out-of-bounds access
lands outside an allocation and memcheck sees it). For each shape it runs the fused forward+backward
(new gradient and grad_inplace=True, vespo and grpo, with masked tokens, an empty sequence and a
temperature) and token_logprobs, and compares with vespo_ext.reference in float64. Shapes include
V = 151937 (odd, just past Qwen's 151936) and V = 1, 7 (smaller than a vector / a warp).
Exit code 1 on a mismatch. --device cpu runs the same checks on the CPU kernels. On CUDA every check
runs once per kernel generation of --kernels (default all: v1, v2, v2-mufu, v2-split; chosen in this
process through vespo_ext._cuda.set_kernel_variant), against the same float64 reference.
"""
import argparse
import sys

import torch

import vespo_ext
from vespo_ext import reference

parser = argparse.ArgumentParser()
parser.add_argument("--device", default="cuda")
parser.add_argument("--quick", action="store_true", help="fewer shapes (for the slower sanitizer tools)")
parser.add_argument("--kernels", default="v1,v2,v2-mufu,v2-split", help="CUDA kernel generations, comma list")
args = parser.parse_args()
device = torch.device(args.device)
if device.type == "cuda":
    from vespo_ext import _cuda

    KERNELS = args.kernels.split(",")
    set_kernels = _cuda.set_kernel_variant
else:
    KERNELS, set_kernels = ["cpu"], (lambda name: None)

# (T, V, dtype, sequence lengths)
SHAPES = [
    (5, 7, torch.float32, [2, 0, 3]),
    (9, 151937, torch.bfloat16, [4, 5]),
    (6, 151937, torch.float32, [1, 5]),
    (33, 1000, torch.float16, [10, 0, 23]),
    (3, 1, torch.float32, [3]),
    (64, 32768, torch.bfloat16, [16, 16, 32]),
    (17, 4099, torch.float32, [17]),
]
if args.quick:
    SHAPES = SHAPES[:3]
TOL = {torch.float32: 2e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # gradient: one rounding to the dtype
LOSS_TOL = 1e-3  # fp32 sums over V and over each sequence, amplified by exp() in phi; vs a float64 oracle
failures = []


ATOL = 1e-6  # fp32 rounding where the exact answer is 0 (V = 1: log-prob and gradient are exactly 0)


def check(name, got, want, tol):
    """max |got - want| <= tol * max |want| + ATOL, and everything finite."""
    a, b = got.detach().double().cpu(), want.detach().double().cpu()
    err, scale = float((a - b).abs().max()), float(b.abs().max())
    ok = err <= tol * scale + ATOL and bool(torch.isfinite(a).all())
    print(f"  {name:34s} max abs diff {err:.2e}  max rel diff {err / max(scale, 1e-30):.2e}  {'ok' if ok else 'FAIL'}")
    if not ok:
        failures.append(name)


for T, V, dtype, lens in SHAPES:
    # Inputs and the float64 reference live on the CPU; only the fused ops run on the device, so the
    # sanitizer watches our kernels rather than torch's.
    g = torch.Generator().manual_seed(T * 7919 + V)
    logits = (torch.randn(T, V, generator=g) * 3).to(dtype)
    labels = torch.randint(0, V, (T,), generator=g)
    labels[::2] = logits[::2].float().argmax(-1)  # confident tokens: the (1 - p) expm1 path
    mask = torch.rand(T, generator=g) > 0.2
    cu = torch.tensor([0] + lens, dtype=torch.int64).cumsum(0)
    S = len(lens)
    lp = reference.token_logprobs(logits.double(), labels, temperature=0.7)
    old = (lp + 0.1 * torch.randn(T, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(S, generator=g)
    dev = [t.to(device) for t in (logits, labels, old, adv, mask, cu)]
    print(f"T={T} V={V} {str(dtype).replace('torch.', '')} seqs={lens}")
    want = {}
    for loss in ("vespo", "grpo"):
        x64 = logits.double().requires_grad_(True)
        w = reference.policy_loss(x64, labels, old, adv, mask, loss=loss, cu_seqlens=cu, temperature=0.7)
        want[loss] = (w, torch.autograd.grad(w, x64)[0])
    for kern in KERNELS:
        set_kernels(kern)
        for loss in ("vespo", "grpo"):
            for inplace in (False, True):
                x = dev[0].clone().requires_grad_(True)
                got = vespo_ext.policy_loss(x, *dev[1:5], loss=loss, cu_seqlens=dev[5], temperature=0.7,
                                            grad_inplace=inplace)
                (ggot,) = torch.autograd.grad(got, x)
                tag = f"{kern} {loss}{' inplace' if inplace else ''}"
                check(f"{tag} loss", got.reshape(1), want[loss][0].reshape(1), LOSS_TOL)
                check(f"{tag} grad", ggot, want[loss][1], TOL[dtype])
        got = vespo_ext.token_logprobs(dev[0], dev[1], temperature=0.7)
        check(f"{kern} token_logprobs", got, lp, 1e-4 if dtype == torch.float32 else 1e-3)
        if device.type == "cuda":
            torch.cuda.synchronize()
    set_kernels(None)

print("FAILED: " + ", ".join(failures) if failures else "cuda_smoke: all ok")
sys.exit(1 if failures else 0)
