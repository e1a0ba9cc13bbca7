"""Datasets in veRL's schema: reading, validation, `vespo data prepare`, and the prompts of task `dataset`.

One row per prompt (a parquet file, or JSON lines with the same fields):

    prompt        list of chat messages [{"role": "user", "content": "..."}]  (column: data.prompt_key)
    reward_model  {"style": "rule", "ground_truth": "..."}                   (the verifier's reference answer)
    data_source   a name, passed to the reward function                       (optional: "" when absent)
    ability       e.g. "math"                                                 (optional)
    extra_info    a dict, passed to reward functions with veRL's signature    (optional)

`prepare` writes that schema from either a file already in it (validated and normalised: string
ground truths, ability and extra_info.index filled in) or question/answer rows: `problem` or
`question`, and `answer` (a GSM8K-style "... #### 72" keeps the part after ####) or `solution`
(the last \\boxed{...} in it), with an instruction appended to the question.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Optional, Tuple

from ..errors import DataError
from .prompt import Prompt

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
QUESTION_KEYS = ("problem", "question")
ANSWER_KEYS = ("answer", "solution")


# -- reading and writing ------------------------------------------------------------------------------
def read_rows(path: str) -> Tuple[List[dict], List[str]]:
    """(rows, column names) of a .parquet or .jsonl/.json (one JSON object per line) file."""
    if not os.path.isfile(path):
        raise DataError(f"no such file: {path}")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # noqa: BLE001 - not parquet, truncated, ...
            raise DataError(f"{path}: cannot read as parquet: {exc}") from None
        return table.to_pylist(), list(table.column_names)
    if path.endswith((".jsonl", ".json")):
        rows = []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as exc:
                        raise DataError(f"{path}:{n}: not a JSON object per line: {exc}") from None
        columns = list(dict.fromkeys(k for r in rows for k in r))
        return rows, columns
    raise DataError(f"{path}: unknown format (expected .parquet, .jsonl or .json)")


def write_parquet(rows: List[dict], path: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


# -- the schema ----------------------------------------------------------------------------------------
def _messages(value, where: str) -> List[dict]:
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"{where}: the prompt must be a non-empty list of chat messages {{role, content}}; "
                        f"got {type(value).__name__}")
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: every chat message needs string 'role' and 'content'; got {m!r}"[:300])
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _ground_truth(value, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: reward_model.ground_truth must be a string or a number; got {value!r}"[:300])
    return str(value)


def check_columns(columns: List[str], path: str, prompt_key: str = "prompt") -> None:
    missing = [c for c in (prompt_key, "reward_model") if c not in columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing} of veRL's schema (prompt list of chat messages, "
                        f"reward_model {{style, ground_truth}}, data_source); columns found: {columns}")


def normalise_verl_row(row: dict, index: int, where: str, prompt_key: str = "prompt") -> dict:
    rm = row.get("reward_model")
    if not isinstance(rm, dict) or "ground_truth" not in rm:
        raise DataError(f"{where}: reward_model must be a dict with a ground_truth; got {rm!r}"[:300])
    extra = dict(row.get("extra_info") or {})
    extra.setdefault("index", index)
    return {"data_source": str(row.get("data_source") or ""), "prompt": _messages(row[prompt_key], where),
            "ability": str(row.get("ability") or "math"),
            "reward_model": {"style": str(rm.get("style") or "rule"),
                             "ground_truth": _ground_truth(rm["ground_truth"], where)},
            "extra_info": extra}


def last_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} (or \\fbox{...}) in `text`, braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def qa_to_verl_row(row: dict, index: int, instruction: str, data_source: str, where: str) -> Optional[dict]:
    """A question/answer row in veRL's schema; None when it has no usable question or answer."""
    question = next((row[k] for k in QUESTION_KEYS if isinstance(row.get(k), str) and row[k].strip()), None)
    answer = row.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if isinstance(answer, str) and "####" in answer:
        answer = answer.rsplit("####", 1)[1]
    if not (isinstance(answer, str) and answer.strip()) and isinstance(row.get("solution"), str):
        answer = last_boxed(row["solution"])
    if question is None or not (isinstance(answer, str) and answer.strip()):
        return None
    content = question.strip() + (" " + instruction if instruction else "")
    return {"data_source": data_source, "prompt": [{"role": "user", "content": content}], "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": answer.strip()}, "extra_info": {"index": index}}


def prepare(input_path: str, output_path: str, instruction: str = INSTRUCTION, data_source: Optional[str] = None,
            log: Callable[[str], None] = print) -> Dict[str, int]:
    """`vespo data prepare`: any supported input -> a parquet file in veRL's schema. Returns counts."""
    rows, columns = read_rows(input_path)
    if not rows:
        raise DataError(f"{input_path}: no rows")
    out, skipped = [], 0
    if "prompt" in columns and "reward_model" in columns:
        kind = "veRL schema (validated, normalised)"
        for i, r in enumerate(rows):
            out.append(normalise_verl_row(r, i, f"{input_path} row {i}"))
    elif any(k in columns for k in QUESTION_KEYS) and any(k in columns for k in ANSWER_KEYS):
        kind = "question/answer rows (converted)"
        source = data_source or os.path.splitext(os.path.basename(input_path))[0]
        for i, r in enumerate(rows):
            new = qa_to_verl_row(r, i, instruction, source, f"{input_path} row {i}")
            if new is None:
                skipped += 1
            else:
                out.append(new)
    else:
        raise DataError(f"{input_path}: expected veRL's schema (columns prompt, reward_model, data_source) or "
                        f"question/answer fields (one of {list(QUESTION_KEYS)} and one of {list(ANSWER_KEYS)}); "
                        f"columns found: {columns}")
    if data_source is not None:
        for r in out:
            r["data_source"] = data_source
    if not out:
        raise DataError(f"{input_path}: none of the {len(rows)} rows has a usable question and answer")
    write_parquet(out, output_path)
    log(f"vespo data prepare: {input_path} ({kind}): {len(rows)} rows read, {len(out)} written to {output_path}"
        + (f", {skipped} skipped (no question or no answer)" if skipped else ""))
    return {"read": len(rows), "written": len(out), "skipped": skipped}


# -- the prompts of task `dataset` -------------------------------------------------------------------
def load_dataset_prompts(data_cfg, tok, log: Callable[[str], None] = print) -> list:
    """Prompts of data.train_files, in file then row order; those over data.max_prompt_length tokens are dropped."""
    prompts, dropped, total = [], 0, 0
    key, limit = data_cfg.prompt_key, data_cfg.max_prompt_length
    for path in data_cfg.train_files:
        rows, columns = read_rows(path)
        check_columns(columns, path, key)
        for i, row in enumerate(rows):
            where = f"{path} row {i}"
            total += 1
            raw = row[key]
            if isinstance(raw, str):
                chat, text = None, raw
            else:
                chat = tuple(_messages(raw, where))
                text = next((m["content"] for m in reversed(chat) if m["role"] == "user"), chat[-1]["content"])
            n_tokens = len(tok.encode_prompt(list(chat) if chat is not None else text))
            if n_tokens > limit:
                dropped += 1
                continue
            rm = row.get("reward_model")
            if not isinstance(rm, dict) or "ground_truth" not in rm:
                raise DataError(f"{where}: reward_model must be a dict with a ground_truth; got {rm!r}"[:300])
            prompts.append(Prompt(len(prompts), text, rm["ground_truth"], chat, str(row.get("data_source") or ""),
                                  dict(row.get("extra_info") or {}) or None))
    log(f"data: {len(prompts)} prompts from {len(data_cfg.train_files)} file(s)"
        + (f"; {dropped} of {total} dropped: longer than data.max_prompt_length={limit} tokens" if dropped else ""))
    if not prompts:
        raise DataError(f"data.train_files: no prompts left ({total} rows; {dropped} longer than "
                        f"data.max_prompt_length={limit} tokens)")
    return prompts
