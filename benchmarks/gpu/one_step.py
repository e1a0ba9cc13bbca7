"""One vespo_loss forward + backward on CUDA at a benchmark shape, nothing else: the program that
run_gpu.sh's opt-in NCU=1 step profiles (ncu replays each kernel, so one call is enough), per forward exp.

    ncu --kernel-name regex:logprob_ ... python benchmarks/gpu/one_step.py --T 8192

Prints the elements per kernel, so ncu's smsp__inst_executed.sum converts to instructions per element
(x 32 threads / elements)."""
from __future__ import annotations

import argparse

import torch

import vespo_ext

ap = argparse.ArgumentParser()
ap.add_argument("--T", type=int, default=8192)
ap.add_argument("--V", type=int, default=151936)
ap.add_argument("--seqs", type=int, default=4)
args = ap.parse_args()
T, V, S = args.T, args.V, args.seqs
g = torch.Generator("cuda").manual_seed(0)
logits = (torch.randn(T, V, generator=g, device="cuda") * 2).to(torch.bfloat16).requires_grad_(True)
labels = torch.randint(0, V, (T,), generator=g, device="cuda")
with torch.no_grad():  # near-on-policy old log-probs (torch, not our kernels: ncu sees only the loss's launches)
    old = torch.cat([torch.log_softmax(logits[r:r + 2048].float(), -1).gather(1, labels[r:r + 2048, None])[:, 0]
                     for r in range(0, T, 2048)]) + 0.05 * torch.randn(T, generator=g, device="cuda")
adv = torch.randn(S, generator=g, device="cuda")
cu = torch.arange(S + 1, device="cuda") * (T // S)
torch.cuda.synchronize()
loss = vespo_ext.vespo_loss(logits, labels, old, adv, cu_seqlens=cu)
loss.backward()
torch.cuda.synchronize()
print(f"one_step: T={T} V={V} bf16, {T * V} elements per logits pass, loss {float(loss.detach()):.6g}")
