"""The tasks (built-in `arith`, or `dataset`: parquet files in veRL's schema, see data.py) and the prompt stream.

Task `arith`: the prompt is "a+b=" (single digits, a in 0..a_max, b in 0..b_max); the right response is
the last digit of a + b followed by EOS (task.answer=sum: the whole sum, one or two digits, e.g.
"7+8=" -> "15"). The reward is 1 if the response text (up to EOS) is exactly that answer, else 0.
The verifier uses string operations only: model output is never evaluated. After the built-in
format warm-up (a random digit then EOS; sum: a random number 0..a_max+b_max) a random policy
scores about 1/10 (sum: about 1/19), so RL has signal from the first step, and a tiny model learns
the table in minutes.

PromptStream yields the prompts of each step in a seeded order (reshuffled each epoch); its
state is a cursor, so a resumed run sees exactly the same prompts.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

from .tokenizer import PRINTABLE, CharTokenizer, load_tokenizer

ALPHABET = "0123456789+="


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


def make_tokenizer(cfg=None):
    """The run's tokenizer: model.path's (Hugging Face), else the built-in character tokenizer
    (task arith: digits, '+', '='; task dataset: printable ASCII plus <unk>). No cfg: arith's."""
    if cfg is None:
        return CharTokenizer(ALPHABET)
    if cfg.task.name == "dataset":
        return load_tokenizer(cfg.model.path, PRINTABLE, unk=True)
    return load_tokenizer(cfg.model.path, ALPHABET)


def arith_prompts(a_max: int, b_max: int, answer: str = "last_digit") -> List[Prompt]:
    """'a+b=' for a in 0..a_max, b in 0..b_max; the expected answer is the last digit of a+b, or
    (answer='sum') the whole sum."""
    if answer not in ("last_digit", "sum"):
        raise ValueError(f"answer must be last_digit or sum; got {answer!r}")
    out = []
    for a in range(a_max + 1):
        for b in range(b_max + 1):
            out.append(Prompt(len(out), f"{a}+{b}=", str(a + b if answer == "sum" else (a + b) % 10)))
    return out


def arith_reward(prompt: str, response: str, ground_truth: str) -> float:
    """1.0 if the response is exactly the expected digit, else 0.0 (string comparison only)."""
    if not isinstance(response, str):
        return 0.0
    return 1.0 if response.strip() == ground_truth else 0.0


def warmup_texts(prompts: List[Prompt], batch_size: int, rng: random.Random, max_answer: int = 9) -> List[tuple]:
    """(prompt, response) pairs for the FORMAT warm-up: a random number 0..max_answer (a random digit by
    default), so no answer is leaked."""
    return [(rng.choice(prompts).text, str(rng.randrange(max_answer + 1))) for _ in range(batch_size)]


def warmup_max_answer(task_cfg) -> int:
    """The largest answer of the arith task (the warm-up draws random answers up to it)."""
    return task_cfg.a_max + task_cfg.b_max if task_cfg.answer == "sum" else 9


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


def max_positions(cfg) -> int:
    """Position-embedding size of the model: the longest prompt + response, with room to spare
    (model.path: the model's own max_position_embeddings)."""
    if cfg.model.path:
        import json
        import os

        with open(os.path.join(cfg.model.path, "config.json")) as f:
            hf = json.load(f)
        return int(hf.get("max_position_embeddings") or hf.get("text_config", {}).get("max_position_embeddings"))
    if cfg.task.name == "dataset":
        return cfg.data.max_prompt_length + cfg.rollout.max_new_tokens + 8
    return 8 + len("9+9=") + cfg.rollout.max_new_tokens + 8


def task_prompts(task_cfg) -> List[Prompt]:
    """The prompt list of the built-in arith task (config.TaskConfig)."""
    return arith_prompts(task_cfg.a_max, task_cfg.b_max, task_cfg.answer)


def load_prompts(cfg, tok, log=print) -> List[Prompt]:
    """The prompts of the configured task; task dataset: data.train_files, prompts longer than
    data.max_prompt_length tokens (chat template included) dropped with a count. Raises ValueError
    (bad files, a tokenizer without chat template for chat prompts, nothing left)."""
    if cfg.task.name != "dataset":
        return task_prompts(cfg.task)
    from .data import load_dataset_prompts

    return load_dataset_prompts(cfg.data, tok, log=log)
