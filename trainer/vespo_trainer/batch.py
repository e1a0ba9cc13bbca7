"""The batch: one typed definition of what a rollout produces and the learner trains on, and the
functions that build, merge and slice it (driver and actors, plain torch).

A batch has one row per sample, prompt-major: the rollout.n responses of a prompt are consecutive
rows, so a mini-batch of whole prompt groups is a contiguous row range. Both rollout backends build it
with `pack_responses`, both loops merge the workers' parts with `merge_rollouts` and hand the learner
`learner_view(batch)` (LEARNER_KEYS), and the learner takes its rows with `select_rows`.
"""
from __future__ import annotations

from typing import List, Sequence, TypedDict

import torch


class Batch(TypedDict, total=False):
    # ROW_TENSORS: one row per sample
    input_ids: torch.Tensor       # (B, P + L) long: the prompt (left-padded) then the response (right-padded)
    attention_mask: torch.Tensor  # (B, P + L) long
    responses: torch.Tensor       # (B, L) long: response token ids (pad after the end)
    response_mask: torch.Tensor   # (B, L) bool: the tokens that count, up to and including EOS
    old_logp: torch.Tensor        # (B, L) float32: behaviour log-probs the rollout engine sampled with
    token_version: torch.Tensor   # (B, L) long: the policy version that sampled each token
    uid: torch.Tensor             # (B,) long: the sample's id, unique over the run
    prompt_id: torch.Tensor       # (B,) long: index of its prompt in the task's prompt list
    # ROW_LISTS: one entry per sample, for the reward workers and the logs
    texts: List[str]              # the decoded responses (up to EOS)
    prompts: List[str]            # the prompt texts (chat prompts: the last user message)
    ground_truths: list
    # set by the driver
    advantages: torch.Tensor      # (B,) float32: GRPO group advantages
    rewards: torch.Tensor         # (B,) float32: a scored group's rewards (the async buffer)
    # not per row
    prompt_len: int               # P
    stats: dict                   # a generate call's own numbers (ended_frac, response_tokens, gen_s, ...)


ROW_TENSORS = ("input_ids", "attention_mask", "responses", "response_mask", "old_logp", "token_version", "uid",
               "prompt_id")
RESPONSE_TENSORS = ROW_TENSORS[2:]  # padded on the right only (merge_rollouts re-pads the two above on both sides)
ROW_LISTS = ("texts", "prompts", "ground_truths")
LEARNER_KEYS = ROW_TENSORS + ("advantages",)  # what Learner.train_batch reads


def pack_responses(tok, n: int, prompts: Sequence, prompt_tok, toks, logps, vers, uid_base: int,
                   group_uids=None) -> Batch:
    """The batch of one generate call, from per-response token / log-prob / version lists (any engine):
    prompts left-padded, responses right-padded, the mask up to and including EOS. Sample ids are
    uid_base + row, or group_uids[i] + j for response j of prompt i."""
    B = len(toks)
    prompt_ids, prompt_mask = tok.pad_left(prompt_tok)
    L = max(1, max(len(t) for t in toks))
    responses = torch.full((B, L), tok.pad_token_id, dtype=torch.long)
    old_logp = torch.zeros((B, L), dtype=torch.float32)
    token_version = torch.zeros((B, L), dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.bool)
    for i, (t, lp, v) in enumerate(zip(toks, logps, vers)):
        k = len(t)
        if k:
            responses[i, :k] = torch.tensor(t)
            old_logp[i, :k] = torch.tensor(lp)
            token_version[i, :k] = torch.tensor(v)
            token_version[i, k:] = v[-1]
            mask[i, :k] = True
    if group_uids is None:
        uid = torch.arange(uid_base, uid_base + B, dtype=torch.long)
    else:
        uid = torch.tensor([g + j for g in group_uids for j in range(n)], dtype=torch.long)
    eos = set(tok.eos_token_ids)
    ended = [bool(t) and t[-1] in eos for t in toks]
    return Batch(
        input_ids=torch.cat([prompt_ids, responses], 1), attention_mask=torch.cat([prompt_mask, mask.long()], 1),
        prompt_len=prompt_ids.shape[1], responses=responses, response_mask=mask, old_logp=old_logp,
        token_version=token_version, uid=uid,
        prompt_id=torch.tensor([p.prompt_id for p in prompts], dtype=torch.long).repeat_interleave(n),
        texts=[tok.decode(t) for t in toks], prompts=[p.text for p in prompts for _ in range(n)],
        ground_truths=[p.ground_truth for p in prompts for _ in range(n)],
        stats={"ended_frac": sum(ended) / max(B, 1), "response_tokens": int(mask.sum())})


def merge_rollouts(parts: List[Batch], pad_id: int) -> Batch:
    """One batch from several (the rollout workers' outputs, or buffered groups): prompts re-padded on the
    left, responses on the right."""
    P = max(p["prompt_len"] for p in parts)
    L = max(p["responses"].shape[1] for p in parts)
    ids, am, out = [], [], {k: [] for k in RESPONSE_TENSORS + ROW_LISTS}
    for p in parts:
        p_len, r_len = p["prompt_len"], p["responses"].shape[1]
        left, right = P - p_len, L - r_len
        ids.append(torch.nn.functional.pad(p["input_ids"], (left, right), value=pad_id))
        am.append(torch.nn.functional.pad(p["attention_mask"], (left, right), value=0))
        for k in RESPONSE_TENSORS:
            t = p[k]
            if t.dim() == 2:
                t = torch.nn.functional.pad(t, (0, right), value=pad_id if k == "responses" else 0)
            out[k].append(t)
        for k in ROW_LISTS:
            out[k] += p[k]
    batch = Batch(**{k: torch.cat(out[k]) for k in RESPONSE_TENSORS}, **{k: out[k] for k in ROW_LISTS})
    batch.update(input_ids=torch.cat(ids), attention_mask=torch.cat(am), prompt_len=P)
    return batch


def select_rows(batch: Batch, rows) -> Batch:
    """The rows `rows` (a slice, or an index tensor) of every per-row field; the rest as it is."""
    out = Batch(**batch)
    for k in ROW_TENSORS + ("advantages", "rewards"):
        if k in batch:
            out[k] = batch[k][rows]
    if isinstance(rows, slice):
        for k in ROW_LISTS:
            if k in batch:
                out[k] = batch[k][rows]
    else:
        for k in ROW_LISTS:
            if k in batch:
                out[k] = [batch[k][int(i)] for i in rows]
    return out


def learner_view(batch: Batch) -> Batch:
    """What the driver sends to the learner: LEARNER_KEYS only (no texts)."""
    return Batch(**{k: batch[k] for k in LEARNER_KEYS})


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
