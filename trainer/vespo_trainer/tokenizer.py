"""Tokenizers: the built-in character tokenizer (made in-process) and a local Hugging Face tokenizer.

Both offer what the trainer needs, so nothing else cares which one a run uses:

    tok.encode_prompt(prompt)   a plain string, or a list of chat messages {role, content} rendered
                                with the tokenizer's chat template (generation prompt appended) -> ids
    tok.encode(text, add_bos)   ids of raw text;  tok.decode(ids) text up to the first EOS
    tok.pad_left(seqs)          (input_ids, attention_mask) tensors, left-padded
    tok.pad_token_id, eos_token_id, bos_token_id, eos_token_ids (every id that ends a response), vocab_size

The character tokenizer's chat template is a small Jinja template (`CHAT_TEMPLATE`); `render_chat`
is the same thing in Python, and the exported Hugging Face tokenizer (hf_export.py) carries the
Jinja version, so the trainer and `AutoTokenizer` produce the same ids.
"""
from __future__ import annotations

import json
import os
import string
from typing import List, Optional, Sequence, Union

from .errors import ConfigError

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
ARITH_ALPHABET = "0123456789+="  # the built-in model's alphabet on the arith task
# Every printable ASCII character but \t\r\x0b\x0c: the alphabet of the built-in model on dataset prompts.
PRINTABLE = "".join(c for c in string.printable if c not in "\t\r\x0b\x0c")
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")

Prompt = Union[str, Sequence[dict]]


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """CHAT_TEMPLATE in Python, without the leading BOS (encode adds it)."""
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple:
    """(input_ids, attention_mask) as (B, P) int64 tensors, left-padded to the longest sequence."""
    import torch

    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, P - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, P - len(s):] = 1
    return ids, mask


class CharTokenizer:
    """One token per character of `alphabet`, plus <pad>, <eos>, <bos> (ids 0, 1, 2) and, with unk=True,
    <unk> (id 3) for characters outside the alphabet (without it they are an error)."""

    chat_template = CHAT_TEMPLATE

    def __init__(self, alphabet: str, unk: bool = False):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError(f"alphabet has repeated characters: {alphabet!r}")
        self.alphabet, self.unk = alphabet, unk
        self.tokens: List[str] = [PAD, EOS, BOS] + ([UNK] if unk else []) + list(alphabet)
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.pad_token_id, self.eos_token_id, self.bos_token_id = 0, 1, 2
        self.unk_token_id = 3 if unk else None
        self.eos_token_ids = (self.eos_token_id,)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, add_bos: bool = True) -> List[int]:
        if self.unk:
            ids = [self.ids.get(c, 3) for c in text]
        else:
            try:
                ids = [self.ids[c] for c in text]
            except KeyError as exc:
                raise ValueError(f"character {exc.args[0]!r} is not in the tokenizer's alphabet") from None
        return ([self.bos_token_id] if add_bos else []) + ids

    def encode_prompt(self, prompt: Prompt) -> List[int]:
        return self.encode(prompt if isinstance(prompt, str) else render_chat(prompt))

    def decode(self, ids: Sequence[int], stop_at_eos: bool = True) -> str:
        """Text of `ids`; <bos> is dropped, other special tokens stay visible (a stray <pad> is not an answer)."""
        out = []
        for i in (int(x) for x in ids):
            if i == self.eos_token_id and stop_at_eos:
                break
            if i != self.bos_token_id:
                out.append(self.tokens[i] if 0 <= i < len(self.tokens) else f"<unk:{i}>")
        return "".join(out)

    def pad_left(self, seqs: Sequence[Sequence[int]]) -> tuple:
        return pad_left(seqs, self.pad_token_id)


class HFTokenizer:
    """A Hugging Face tokenizer from a local directory (never downloads), behind the trainer's interface.

    EOS: the tokenizer's eos token plus any `eos_token_id` of the directory's generation_config.json
    (chat models end a turn with a token of their own); PAD: the tokenizer's, else its EOS.
    """

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        try:
            self.hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any loader failure: name the key and the path
            raise ConfigError(f"model.path: cannot load a tokenizer from {path}: {type(exc).__name__}: {exc}") from None
        self.path = path
        if self.hf.eos_token_id is None:
            raise ConfigError(f"model.path: the tokenizer in {path} has no eos token")
        self.eos_token_id = int(self.hf.eos_token_id)
        eos = [self.eos_token_id] + _generation_eos(path)
        self.eos_token_ids = tuple(dict.fromkeys(eos))
        self.pad_token_id = int(self.hf.pad_token_id if self.hf.pad_token_id is not None else self.eos_token_id)
        self.bos_token_id = self.hf.bos_token_id
        self.chat_template = self.hf.chat_template

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def require_chat_template(self, what: str) -> None:
        if not self.chat_template:
            raise ConfigError(f"model.path: the tokenizer in {self.path} has no chat template, but {what} are chat "
                             "messages; use a tokenizer with a chat_template (tokenizer_config.json or "
                             "chat_template.jinja)")

    def encode(self, text: str, add_bos: bool = True) -> List[int]:
        return list(self.hf(text, add_special_tokens=add_bos)["input_ids"])

    def encode_prompt(self, prompt: Prompt) -> List[int]:
        if isinstance(prompt, str):
            return self.encode(prompt)
        self.require_chat_template("the prompts")
        text = self.hf.apply_chat_template([dict(m) for m in prompt], tokenize=False, add_generation_prompt=True)
        return self.encode(text, add_bos=False)  # the template writes any BOS itself

    def decode(self, ids: Sequence[int], stop_at_eos: bool = True) -> str:
        ids = [int(x) for x in ids]
        if stop_at_eos:
            for k, i in enumerate(ids):
                if i in self.eos_token_ids:
                    ids = ids[:k]
                    break
        return self.hf.decode(ids, skip_special_tokens=True)

    def pad_left(self, seqs: Sequence[Sequence[int]]) -> tuple:
        return pad_left(seqs, self.pad_token_id)


def _generation_eos(path: str) -> List[int]:
    try:
        with open(os.path.join(path, "generation_config.json")) as f:
            eos = json.load(f).get("eos_token_id")
    except (OSError, ValueError):
        return []
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def load_tokenizer(path: Optional[str], alphabet: str, unk: bool = False):
    """HFTokenizer(path) when a model directory is given, else the built-in CharTokenizer(alphabet)."""
    return HFTokenizer(path) if path else CharTokenizer(alphabet, unk=unk)


def make_tokenizer(cfg=None):
    """The run's tokenizer: model.path's (Hugging Face), else the built-in character tokenizer
    (task arith: digits, '+', '='; task dataset: printable ASCII plus <unk>). No cfg: arith's."""
    if cfg is None:
        return CharTokenizer(ARITH_ALPHABET)
    if cfg.task.name == "dataset":
        return load_tokenizer(cfg.model.path, PRINTABLE, unk=True)
    return load_tokenizer(cfg.model.path, ARITH_ALPHABET)
