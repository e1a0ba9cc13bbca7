"""The policy model: a tiny causal LM built from a transformers config (no download), seeded init."""
from __future__ import annotations

import json
import os

import torch

from .config import check_model_dir
from .errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_model(mcfg, tokenizer, seed: int, dtype: str = "fp32", max_positions: int = 64):
    """A freshly initialised Qwen2 or Llama causal LM sized by `mcfg` (config.ModelConfig).

    The same seed gives the same weights on every process, so learner and rollout replicas agree
    before the first weight sync (which overwrites the rollout copy anyway).
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls_cfg, cls_model = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[mcfg.arch]
    hf_cfg = cls_cfg(
        vocab_size=tokenizer.vocab_size, hidden_size=mcfg.hidden_size, intermediate_size=mcfg.intermediate_size,
        num_hidden_layers=mcfg.num_layers, num_attention_heads=mcfg.num_heads, num_key_value_heads=mcfg.num_kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=mcfg.tie_embeddings,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, initializer_range=mcfg.init_std, rms_norm_eps=mcfg.norm_eps,
        use_cache=True)
    hf_cfg._attn_implementation = "sdpa"
    devices = ["cuda"] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = cls_model(hf_cfg)
    return model.to(DTYPES[dtype])


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def max_positions(cfg) -> int:
    """Position-embedding size of the model: the longest prompt + response, with room to spare
    (model.path: the model's own max_position_embeddings)."""
    if cfg.model.path:
        with open(os.path.join(cfg.model.path, "config.json")) as f:
            hf = json.load(f)
        return int(hf.get("max_position_embeddings") or hf.get("text_config", {}).get("max_position_embeddings"))
    if cfg.task.name == "dataset":
        return cfg.data.max_prompt_length + cfg.rollout.max_new_tokens + 8
    return 8 + len("9+9=") + cfg.rollout.max_new_tokens + 8


def load_policy(cfg, tokenizer, dtype: str = "fp32"):
    """The policy of a run: `model.path` loaded with transformers (local files only, never a download),
    or the tiny built-in model of `cfg.model` (seeded by trainer.seed)."""
    path = cfg.model.path
    if not path:
        return build_model(cfg.model, tokenizer, seed=cfg.trainer.seed, dtype=dtype, max_positions=max_positions(cfg))
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    check_model_dir(path)
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in transformers 4.56
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, attn_implementation="sdpa",
                                                     **{dtype_kw: DTYPES[dtype]})
    except Exception as exc:  # noqa: BLE001 - name the key and the path whatever went wrong
        raise ConfigError(f"model.path: cannot load a causal LM from {path}: {type(exc).__name__}: {exc}") from None
    # Sampling defaults of the directory (top_p, top_k, repetition_penalty, ...) must not leak into the rollout:
    # the behaviour log-probs are those of plain temperature sampling from the raw logits.
    model.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=list(tokenizer.eos_token_ids))
    return model
