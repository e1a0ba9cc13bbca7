"""Batch assembly and GRPO group advantages (driver side, plain torch).

A batch is a dict of tensors with one row per sample, prompt-major: the rollout.n responses of a
prompt are consecutive rows, so a mini-batch of whole prompt groups is a contiguous row range.
"""
from __future__ import annotations

from typing import List

import torch

TENSOR_KEYS = ("responses", "response_mask", "old_logp", "token_version", "uid", "prompt_id")
LIST_KEYS = ("texts", "prompts", "ground_truths")


def merge_rollouts(parts: List[dict], pad_id: int) -> dict:
    """One batch from the rollout workers' outputs: prompts re-padded on the left, responses on the right."""
    P = max(p["prompt_len"] for p in parts)
    L = max(p["responses"].shape[1] for p in parts)
    ids, am, out = [], [], {k: [] for k in TENSOR_KEYS + LIST_KEYS}
    for p in parts:
        p_len, r_len = p["prompt_len"], p["responses"].shape[1]
        left, right = P - p_len, L - r_len
        ids.append(torch.nn.functional.pad(p["input_ids"], (left, right), value=pad_id))
        am.append(torch.nn.functional.pad(p["attention_mask"], (left, right), value=0))
        for k in TENSOR_KEYS:
            t = p[k]
            if t.dim() == 2:
                t = torch.nn.functional.pad(t, (0, right), value=pad_id if k == "responses" else 0)
            out[k].append(t)
        for k in LIST_KEYS:
            out[k] += p[k]
    batch = {k: torch.cat(v) for k, v in out.items() if k in TENSOR_KEYS}
    batch.update({k: out[k] for k in LIST_KEYS})
    batch.update(input_ids=torch.cat(ids), attention_mask=torch.cat(am), prompt_len=P)
    return batch


def group_advantages(rewards: torch.Tensor, n: int, eps: float = 1e-6, norm_by_std: bool = True) -> torch.Tensor:
    """GRPO: A = (R - mean of its group) / (std of its group + eps); groups are n consecutive rows."""
    if rewards.numel() % n:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {n}")
    g = rewards.double().view(-1, n)
    adv = g - g.mean(1, keepdim=True)
    if norm_by_std:
        adv = adv / (g.std(1, keepdim=True) + eps)
    return adv.view(-1).float()


def split_groups(num_prompts: int, num_workers: int) -> List[range]:
    """Contiguous, nearly equal prompt ranges, one per rollout worker (empty ones dropped)."""
    bounds = [round(i * num_prompts / num_workers) for i in range(num_workers + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
