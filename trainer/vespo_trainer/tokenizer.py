"""A character-level tokenizer made in-process (nothing to download), for the built-in task.

Hugging Face `generate` needs only token ids plus pad/eos ids, so this is a small plain class:
encode / decode / batch encoding with left padding (prompts) and the special ids.
"""
from __future__ import annotations

from typing import List, Sequence

PAD, EOS, BOS = "<pad>", "<eos>", "<bos>"


class CharTokenizer:
    """One token per character of `alphabet`, plus <pad>, <eos>, <bos> (ids 0, 1, 2)."""

    def __init__(self, alphabet: str):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError(f"alphabet has repeated characters: {alphabet!r}")
        self.tokens: List[str] = [PAD, EOS, BOS] + list(alphabet)
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.pad_token_id, self.eos_token_id, self.bos_token_id = 0, 1, 2

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, add_bos: bool = True) -> List[int]:
        try:
            ids = [self.ids[c] for c in text]
        except KeyError as exc:
            raise ValueError(f"character {exc.args[0]!r} is not in the tokenizer's alphabet") from None
        return ([self.bos_token_id] if add_bos else []) + ids

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
        """(input_ids, attention_mask) as (B, P) int64 tensors, left-padded to the longest prompt."""
        import torch

        P = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), P), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), P), dtype=torch.long)
        for i, s in enumerate(seqs):
            if s:
                ids[i, P - len(s):] = torch.tensor(list(s), dtype=torch.long)
                mask[i, P - len(s):] = 1
        return ids, mask
