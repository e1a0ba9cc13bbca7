"""The built-in task `arith`: prompts, verifier and the format warm-up.

The prompt is "a+b=" (single digits, a in 0..a_max, b in 0..b_max); the right response is
the last digit of a + b followed by EOS (task.answer=sum: the whole sum, one or two digits, e.g.
"7+8=" -> "15"). The reward is 1 if the response text (up to EOS) is exactly that answer, else 0.
The verifier uses string operations only: model output is never evaluated. After the built-in
format warm-up (a random digit then EOS; sum: a random number 0..a_max+b_max) a random policy
scores about 1/10 (sum: about 1/19), so RL has signal from the first step, and a tiny model learns
the table in minutes.
"""
from __future__ import annotations

import random
from typing import List

from .prompt import Prompt


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


def task_prompts(task_cfg) -> List[Prompt]:
    """The prompt list of the built-in arith task (config.TaskConfig)."""
    return arith_prompts(task_cfg.a_max, task_cfg.b_max, task_cfg.answer)
