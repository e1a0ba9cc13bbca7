"""Hugging Face directories: a model + tokenizer saved so that transformers (and vLLM) load them.

    save_hf_dir(model, tokenizer, path)          config.json + model.safetensors + tokenizer files
    make_tiny_hf_dir(path)                       a tiny random Qwen2/Llama + character tokenizer, for tests
    export_checkpoint(run_dir, out, tag=None)    `vespo export`: a run's checkpoint as such a directory

The built-in CharTokenizer becomes a real fast tokenizer built with the `tokenizers` library: a
BPE model with one token per character and no merges (so every character is one token, with the
same ids), <pad>/<eos>/<bos>(/<unk>) as special tokens, a post-processor that prepends <bos> as
CharTokenizer.encode does, and its chat template. `AutoTokenizer.from_pretrained(dir)` then gives
the ids the trainer uses, and `AutoModelForCausalLM.from_pretrained(dir)` the learner's logits.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from . import checkpoint as ckpt
from .config import ModelConfig, load_config
from .errors import CheckpointError, RunNotFound
from .model import build_model, load_policy
from .tokenizer import BOS, EOS, PAD, PRINTABLE, UNK, CharTokenizer, HFTokenizer, make_tokenizer

# The pre-tokenizer split of Qwen2 tokenizers (words, single digits, punctuation runs, whitespace).
SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
               r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def byte_chars() -> dict:
    """byte -> the printable character that stands for it in byte-level BPE vocabularies (GPT-2's scheme:
    printable Latin-1 bytes stand for themselves, the others are shifted past 255 in order)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def char_tokenizer_to_hf(tok: CharTokenizer):
    """A transformers fast tokenizer with the ids, specials and chat template of `tok`.

    The pipeline is the byte-level one of Qwen2/GPT-2 tokenizers (NFC, split regex, byte-level
    pre-tokenizer and decoder) over a vocabulary of single byte-characters and no merges. transformers 5
    rebuilds exactly that pipeline for a qwen2 model directory whatever tokenizer.json says, and older
    versions read tokenizer.json as it is: both give one token per ASCII character, with CharTokenizer's
    ids. (A non-ASCII character is <unk> for CharTokenizer but one or more byte tokens here.)
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    bc = byte_chars()
    specials = [PAD, EOS, BOS] + ([UNK] if tok.unk else [])
    vocab = {t if t in specials else bc[ord(t)]: i for i, t in enumerate(tok.tokens) if t in specials or ord(t) < 128}
    if len(vocab) != tok.vocab_size:
        raise ValueError("char_tokenizer_to_hf: the alphabet must be ASCII")
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK if tok.unk else None))
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(specials)
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                        special_tokens=[(BOS, tok.bos_token_id)])
    kw = {"unk_token": UNK if tok.unk else EOS}  # (a Qwen2Tokenizer would otherwise add an unk token of its own)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   padding_side="left", chat_template=tok.chat_template, **kw)


def save_hf_dir(model, tokenizer, path: str) -> str:
    """Write `model` (a transformers causal LM; saved in fp32 on CPU copies) and `tokenizer` (CharTokenizer,
    HFTokenizer or a transformers tokenizer) to `path` as a Hugging Face directory; returns the path."""
    os.makedirs(path, exist_ok=True)
    if isinstance(tokenizer, CharTokenizer):
        hf_tok = char_tokenizer_to_hf(tokenizer)
        eos_ids = list(tokenizer.eos_token_ids)
    elif isinstance(tokenizer, HFTokenizer):
        hf_tok, eos_ids = tokenizer.hf, list(tokenizer.eos_token_ids)
    else:
        hf_tok, eos_ids = tokenizer, [tokenizer.eos_token_id]
    gc = model.generation_config
    gc.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    gc.pad_token_id = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else eos_ids[0]
    gc.bos_token_id = hf_tok.bos_token_id
    model.save_pretrained(path, safe_serialization=True)
    hf_tok.save_pretrained(path)
    return path


def make_tiny_hf_dir(path: str, *, arch: str = "qwen2", seed: int = 0, max_positions: int = 512,
                     alphabet: Optional[str] = None, **model_keys) -> str:
    """A tiny random causal LM (config.ModelConfig defaults, overridable: hidden_size=32, ...) with the
    printable-ASCII character tokenizer (and its chat template) saved as a Hugging Face directory: a
    `model.path` for tests, with no download. Returns the path."""
    tok = CharTokenizer(PRINTABLE, unk=True) if alphabet is None else CharTokenizer(alphabet)
    model = build_model(ModelConfig(arch=arch, **model_keys), tok, seed=seed, max_positions=max_positions)
    return save_hf_dir(model, tok, path)


def _checkpoint_state_dict(ckpt_dir: str, tag: str, zero_stage: int) -> dict:
    """The learner's full fp32 weights from a DeepSpeed checkpoint (ZeRO-3: gathered from the shards)."""
    if zero_stage == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    path = os.path.join(ckpt_dir, tag, "mp_rank_00_model_states.pt")
    if not os.path.isfile(path):
        raise RunNotFound(f"{path} not found (not a DeepSpeed checkpoint of `vespo train`?)")
    # our own checkpoint file (it also holds the run's RNG state and DeepSpeed bookkeeping)
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


def export_checkpoint(run_dir: str, out: str, tag: Optional[str] = None, log=print) -> str:
    """RUN_DIR's checkpoint `tag` (default: the latest) as a Hugging Face directory at `out`."""
    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise RunNotFound(f"{run_dir} has no config.yaml (not a run directory of `vespo train`)")
    cfg = load_config(cfg_path)
    tag = tag or ckpt.latest(run_dir)
    if tag is None:
        raise RunNotFound(f"{run_dir} has no checkpoint yet")
    if not os.path.isdir(os.path.join(ckpt.ckpt_root(run_dir), tag)):
        have = sorted(t for t in os.listdir(ckpt.ckpt_root(run_dir)) if t.startswith("step_"))
        raise RunNotFound(f"{run_dir} has no checkpoint {tag!r}; it has {have}")
    tok = make_tokenizer(cfg)
    model = load_policy(cfg, tok, dtype="fp32")
    state = _checkpoint_state_dict(ckpt.ckpt_root(run_dir), tag, cfg.actor.zero_stage)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"checkpoint {tag} does not fit the run's model: missing {sorted(set(missing) - tied)}, "
                           f"unexpected {sorted(unexpected)}")
    if tied:
        model.tie_weights()
    with torch.no_grad():
        save_hf_dir(model.float().eval(), tok, out)
    log(f"vespo export: {run_dir} {tag} -> {out} ({sum(p.numel() for p in model.parameters()):,} params)")
    return out
