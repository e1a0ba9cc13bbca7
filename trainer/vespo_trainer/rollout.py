"""Rollout worker: samples responses with Hugging Face `generate` and reports per-token log-probs.

Each call gets prompt groups and returns a batch of padded tensors (see `Batch` in samples.py) with,
per sample, a unique id, its prompt id, the policy version that generated every token, the
response ids, the mask (up to and including EOS) and the behaviour log-probs: log-softmax of the
raw logits the sampler drew from, at the sampling temperature, computed by vespo_ext.token_logprobs.
Sampling is seeded from (seed, step, worker), so a resumed run draws the same responses.
With partial rollout (async mode) a weight update may interrupt a call between two tokens; the
response then continues under the new weights and carries one version per token (see generate).
"""
from __future__ import annotations

import os
import threading
import time
from typing import List, Optional

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
        self._cv = threading.Condition()  # guards _pause/_busy: a weight update never lands mid-segment
        self._pause = False  # a weight update is waiting
        self._busy = False   # a generation segment is running
        self._tokens = 0     # tokens sampled so far in the current segment

    def update_weights(self, refs: List, version: int) -> dict:
        """Load new weights. Generation in flight pauses at its next token (partial rollout) or, when it is
        not interruptible, this waits for its current segment to end; either way no token mixes versions."""
        from .weight_sync import load_buckets

        t0 = time.perf_counter()
        with self._cv:
            self._pause = True
            self._cv.wait_for(lambda: not self._busy)
        try:
            nbytes = load_buckets(self.model, refs)
            self.version = int(version)
        finally:
            with self._cv:
                self._pause = False
                self._cv.notify_all()
        return {"bytes": nbytes, "seconds": time.perf_counter() - t0, "version": self.version}

    def status(self) -> dict:
        """What the worker is doing (answered while it generates, when the actor is threaded)."""
        return {"version": self.version, "busy": self._busy, "tokens": self._tokens, "pid": os.getpid()}

    @torch.no_grad()
    def generate(self, prompts: List[Prompt], step: int, uid_base: int, *, group_uids: Optional[List[int]] = None,
                 interruptible: bool = False) -> dict:
        """All rollout.n responses of each prompt.

        Sample ids are uid_base + row (contiguous), or group_uids[i] + j for response j of prompt i.
        interruptible (partial rollout): a weight update arriving mid-generation stops the current segment
        at the next token; the unfinished responses continue under the new weights, and every token keeps
        the policy version and the behaviour log-prob of the weights that sampled it.
        """
        if self.version < 0:
            raise RuntimeError("rollout worker has no weights yet (update_weights was never called)")
        rc, n = self.cfg.rollout, self.cfg.rollout.n
        t0 = time.perf_counter()
        prompt_tok = [self.tok.encode_prompt(p.model_input) for p in prompts for _ in range(n)]
        B = len(prompt_tok)
        toks: List[List[int]] = [[] for _ in range(B)]
        logps: List[List[float]] = [[] for _ in range(B)]
        vers: List[List[int]] = [[] for _ in range(B)]
        active, remaining, segment = list(range(B)), rc.max_new_tokens, 0
        eos = set(self.tok.eos_token_ids)
        while active and remaining > 0:
            with self._cv:
                self._cv.wait_for(lambda: not self._pause)
                self._busy, self._tokens = True, 0
                version = self.version
            try:
                new, logp = self._sample([prompt_tok[i] + toks[i] for i in active], remaining,
                                         stable_seed(self.cfg.trainer.seed, "rollout", step, self.rank,
                                                     *([segment] if segment else [])), interruptible)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
            still = []
            for row, i in enumerate(active):
                r = new[row].tolist()
                end = next((k + 1 for k, t in enumerate(r) if t in eos), None)
                toks[i] += r[:end]
                logps[i] += logp[row, :end].tolist()
                vers[i] += [version] * len(r[:end])
                if end is None:
                    still.append(i)
            remaining -= new.shape[1]
            active, segment = still, segment + 1
        out = pack_responses(self.tok, n, prompts, prompt_tok, toks, logps, vers, uid_base, group_uids)
        out["stats"].update(gen_s=time.perf_counter() - t0, threads=self.threads, segments=segment)
        return out

    def _sample(self, seqs: List[List[int]], max_new: int, seed: int, interruptible: bool) -> tuple:
        """One generate call: (new tokens (B, l), their behaviour log-probs (B, l)) at the sampling temperature."""
        import vespo_ext
        from transformers import GenerationConfig, StoppingCriteriaList

        rc = self.cfg.rollout
        ids, am = self.tok.pad_left(seqs)
        ids, am = ids.to(self.device), am.to(self.device)
        gen_cfg = GenerationConfig(
            do_sample=True, temperature=rc.temperature, top_p=rc.top_p, top_k=0, max_new_tokens=max_new,
            pad_token_id=self.tok.pad_token_id, eos_token_id=list(self.tok.eos_token_ids),
            bos_token_id=self.tok.bos_token_id,
            output_logits=True, return_dict_in_generate=True)
        stop = StoppingCriteriaList([_pause_criteria(self)] if interruptible else [])
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = self.model.generate(input_ids=ids, attention_mask=am, generation_config=gen_cfg,
                                      stopping_criteria=stop)
        new = out.sequences[:, ids.shape[1]:]
        # Raw logits of each sampling step (before temperature / top-p processors), fp32.
        logits = torch.stack(out.logits, 1).float()
        return new.cpu(), vespo_ext.token_logprobs(logits, new, temperature=rc.temperature).cpu()

def pack_responses(tok, n: int, prompts: List[Prompt], prompt_tok, toks, logps, vers, uid_base: int,
                   group_uids: Optional[List[int]]) -> dict:
    """The batch of one generate call, from per-response token / log-prob / version lists (any engine):
    prompts left-padded, responses right-padded, the mask up to and including EOS."""
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
    return {
        "input_ids": torch.cat([prompt_ids, responses], 1),   # (B, P + L) prompt (left-padded) + response
        "attention_mask": torch.cat([prompt_mask, mask.long()], 1),
        "prompt_len": prompt_ids.shape[1],
        "responses": responses,                                # (B, L)
        "response_mask": mask,                                 # (B, L) bool: tokens up to and incl. EOS
        "old_logp": old_logp,                                  # (B, L) behaviour log-probs (rollout engine)
        "token_version": token_version,                        # (B, L) policy version that sampled each token
        "uid": uid,
        "prompt_id": torch.tensor([p.prompt_id for p in prompts], dtype=torch.long).repeat_interleave(n),
        "texts": [tok.decode(t) for t in toks],
        "prompts": [p.text for p in prompts for _ in range(n)],
        "ground_truths": [p.ground_truth for p in prompts for _ in range(n)],
        "stats": {"ended_frac": sum(ended) / max(B, 1), "response_tokens": int(mask.sum())},
    }


def _pause_criteria(worker: RolloutWorker):
    """A transformers stopping criterion: stop every row once a weight update is waiting (partial rollout)."""
    from transformers import StoppingCriteria

    class PauseCriteria(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            worker._tokens += 1
            return torch.full((input_ids.shape[0],), worker._pause, dtype=torch.bool, device=input_ids.device)

    return PauseCriteria()


def _want_cuda(cfg) -> bool:
    return cfg.trainer.device == "cuda" or (cfg.trainer.device == "auto" and torch.cuda.is_available())

