"""Which prompts a run uses: the built-in arith task's, or (task dataset) those of data.train_files."""
from __future__ import annotations

from typing import List

from .arith import task_prompts
from .prompt import Prompt
from .verl import load_dataset_prompts


def load_prompts(cfg, tok, log=print) -> List[Prompt]:
    """The prompts of the configured task; task dataset: data.train_files, prompts longer than
    data.max_prompt_length tokens (chat template included) dropped with a count. Raises DataError or
    ConfigError (bad files, a tokenizer without chat template for chat prompts, nothing left)."""
    if cfg.task.name != "dataset":
        return task_prompts(cfg.task)
    return load_dataset_prompts(cfg.data, tok, log=log)
