"""Rollout worker: samples responses with Hugging Face `generate` and reports per-token log-probs.

Each call gets prompt groups and returns a batch of padded tensors (`Batch`, batch.py) with,
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

import vespo_ext

from ..batch import Batch, pack_responses
from ..data.prompt import Prompt
from ..model import load_policy
from ..runtime import quiet_libraries, set_threads, stable_seed, use_cuda
from ..tokenizer import make_tokenizer
from ..weight_sync import load_buckets


class HFRolloutWorker:
    """rollout.backend=hf (rollout.base.RolloutBackend)."""

    def __init__(self, cfg, rank: int):
        quiet_libraries()
        self.cfg, self.rank = cfg, rank
        self.threads = set_threads(cfg.trainer.num_threads)
        self.device = torch.device("cuda" if use_cuda(cfg) else "cpu")
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
                 interruptible: bool = False) -> Batch:
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


def _pause_criteria(worker: HFRolloutWorker):
    """A transformers stopping criterion: stop every row once a weight update is waiting (partial rollout)."""
    from transformers import StoppingCriteria

    class PauseCriteria(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            worker._tokens += 1
            return torch.full((input_ids.shape[0],), worker._pause, dtype=torch.bool, device=input_ids.device)

    return PauseCriteria()
