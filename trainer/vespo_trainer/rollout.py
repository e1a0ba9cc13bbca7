"""Rollout worker: samples responses with Hugging Face `generate` and reports per-token log-probs.

Each call gets prompt groups and returns a batch of padded tensors (see `Batch` in samples.py) with,
per sample, a unique id, its prompt id, the policy version that generated every token, the
response ids, the mask (up to and including EOS) and the behaviour log-probs: log-softmax of the
raw logits the sampler drew from, at the sampling temperature, computed by vespo_ext.token_logprobs.
Sampling is seeded from (seed, step, worker), so a resumed run draws the same responses.
"""
from __future__ import annotations

import time
from typing import List

import torch

from .model import load_policy
from .runtime import quiet_libraries, set_threads, stable_seed
from .task import Prompt, make_tokenizer


class RolloutWorker:
    def __init__(self, cfg, rank: int):
        quiet_libraries()
        self.cfg, self.rank = cfg, rank
        self.threads = set_threads(cfg.trainer.num_threads)
        self.device = torch.device("cuda" if _want_cuda(cfg) else "cpu")
        self.tok = make_tokenizer(cfg)
        self.model = load_policy(cfg, self.tok, dtype=cfg.rollout.dtype).to(self.device).eval()
        self.version = -1  # no weights from the learner yet

    def update_weights(self, refs: List, version: int) -> dict:
        from .weight_sync import load_buckets

        t0 = time.perf_counter()
        nbytes = load_buckets(self.model, refs)
        self.version = int(version)
        return {"bytes": nbytes, "seconds": time.perf_counter() - t0}

    @torch.no_grad()
    def generate(self, prompts: List[Prompt], step: int, uid_base: int) -> dict:
        """All rollout.n responses of each prompt; uids are uid_base + index (unique over the run)."""
        import vespo_ext
        from transformers import GenerationConfig

        if self.version < 0:
            raise RuntimeError("rollout worker has no weights yet (update_weights was never called)")
        rc, n = self.cfg.rollout, self.cfg.rollout.n
        t0 = time.perf_counter()
        prompt_ids, prompt_mask = self.tok.pad_left([self.tok.encode_prompt(p.model_input) for p in prompts])
        prompt_ids = prompt_ids.repeat_interleave(n, 0).to(self.device)
        prompt_mask = prompt_mask.repeat_interleave(n, 0).to(self.device)
        gen_cfg = GenerationConfig(
            do_sample=True, temperature=rc.temperature, top_p=rc.top_p, top_k=0, max_new_tokens=rc.max_new_tokens,
            pad_token_id=self.tok.pad_token_id, eos_token_id=list(self.tok.eos_token_ids),
            bos_token_id=self.tok.bos_token_id,
            output_logits=True, return_dict_in_generate=True)
        seed = stable_seed(self.cfg.trainer.seed, "rollout", step, self.rank)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = self.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=gen_cfg)
        P = prompt_ids.shape[1]
        responses = out.sequences[:, P:]
        B, L = responses.shape
        # Raw logits of each sampling step (before temperature / top-p processors), fp32.
        logits = torch.stack(out.logits, 1).float()
        old_logp = vespo_ext.token_logprobs(logits, responses, temperature=rc.temperature)
        is_eos = torch.isin(responses, torch.tensor(self.tok.eos_token_ids, device=responses.device))
        ended = is_eos.any(1)
        length = torch.where(ended, is_eos.int().argmax(1) + 1, torch.full_like(ended, L, dtype=torch.long))
        mask = (torch.arange(L, device=responses.device)[None, :] < length[:, None])
        old_logp = old_logp.masked_fill(~mask, 0.0)
        texts = [self.tok.decode(r[: int(ln)].tolist()) for r, ln in zip(responses.cpu(), length.cpu())]
        gen_s = time.perf_counter() - t0
        return {
            "input_ids": out.sequences.cpu(),                      # (B, P + L) prompt (left-padded) + response
            "attention_mask": torch.cat([prompt_mask, mask.long()], 1).cpu(),
            "prompt_len": P,
            "responses": responses.cpu(),                          # (B, L)
            "response_mask": mask.cpu(),                           # (B, L) bool: tokens up to and incl. EOS
            "old_logp": old_logp.cpu(),                            # (B, L) behaviour log-probs (rollout engine)
            "token_version": torch.full((B, L), self.version, dtype=torch.long),
            "uid": torch.arange(uid_base, uid_base + B, dtype=torch.long),
            "prompt_id": torch.tensor([p.prompt_id for p in prompts], dtype=torch.long).repeat_interleave(n),
            "texts": texts,
            "prompts": [p.text for p in prompts for _ in range(n)],
            "ground_truths": [p.ground_truth for p in prompts for _ in range(n)],
            "stats": {"gen_s": gen_s, "ended_frac": float(ended.float().mean()), "threads": self.threads,
                      "response_tokens": int(mask.sum())},
        }


def _want_cuda(cfg) -> bool:
    return cfg.trainer.device == "cuda" or (cfg.trainer.device == "auto" and torch.cuda.is_available())

