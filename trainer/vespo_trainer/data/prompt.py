"""A prompt of the run (any task), and the seeded, resumable order in which the prompts are used.

PromptStream yields the prompts of each step in a seeded order (reshuffled each epoch); its
state is a cursor, so a resumed run sees exactly the same prompts.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple


@dataclass(frozen=True)
class Prompt:
    prompt_id: int  # index in the task's prompt list
    text: str  # the prompt as plain text (chat prompts: the last user message); reward functions see it
    ground_truth: Any
    chat: Optional[Tuple[dict, ...]] = None  # chat messages {role, content}; the model sees these when set
    data_source: str = ""
    extra_info: Optional[dict] = None

    @property
    def model_input(self):
        """What the tokenizer encodes: the chat messages, or the plain text."""
        return list(self.chat) if self.chat is not None else self.text


class PromptStream:
    """Seeded epoch-shuffled prompt order with a resumable cursor."""

    def __init__(self, prompts: List[Prompt], seed: int, shuffle: bool = True):
        if not prompts:
            raise ValueError("the task has no prompts")
        self.prompts, self.seed, self.shuffle = prompts, seed, shuffle
        self.cursor = 0  # prompts consumed so far, over all epochs

    def _order(self, epoch: int) -> List[int]:
        order = list(range(len(self.prompts)))
        if self.shuffle:
            random.Random(f"{self.seed}/prompts/{epoch}").shuffle(order)
        return order

    def next_batch(self, size: int) -> List[Prompt]:
        out, n = [], len(self.prompts)
        while len(out) < size:
            epoch, pos = divmod(self.cursor, n)
            out.append(self.prompts[self._order(epoch)[pos]])
            self.cursor += 1
        return out

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state["cursor"])
