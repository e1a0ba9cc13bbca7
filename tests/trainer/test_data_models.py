"""Models, tokenizers, data and the math reward without Ray: local HF directories, veRL-schema parquet,
`vespo data prepare`, clear errors on bad inputs, math-verify on known answers."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("pyarrow")
pytest.importorskip("math_verify")

import torch  # noqa: E402
from trainer_test_utils import ROOT, TINY  # noqa: E402

from vespo_trainer import cli  # noqa: E402
from vespo_trainer.config import ConfigError, load_config  # noqa: E402
from vespo_trainer.data.tasks import load_prompts  # noqa: E402
from vespo_trainer.data.verl import (  # noqa: E402
    DataError,
    last_boxed,  # noqa: E402
    load_dataset_prompts,
    prepare,
    read_rows,
    write_parquet,
)
from vespo_trainer.hf_export import make_tiny_hf_dir  # noqa: E402
from vespo_trainer.model import build_model, load_policy  # noqa: E402
from vespo_trainer.reward.math_reward import compute_score  # noqa: E402
from vespo_trainer.tokenizer import PRINTABLE, CharTokenizer, HFTokenizer, make_tokenizer  # noqa: E402

SAMPLE = os.path.join(ROOT, "examples", "data", "math_sample.parquet")
MSGS = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What's 1/2 + \\frac{3}{4}?\n  Two  spaces {x}"}]


def tiny_hf_dir(path, alphabet=None, arch="qwen2", seed=0):
    """(path, the model, its CharTokenizer): hf_export.make_tiny_hf_dir with the sizes of tiny.yaml."""
    sizes = {k: v for k, v in vars(load_config(TINY).model).items() if k not in ("path", "arch")}
    make_tiny_hf_dir(str(path), arch=arch, seed=seed, max_positions=320, alphabet=alphabet, **sizes)
    tok = CharTokenizer(PRINTABLE, unk=True) if alphabet is None else CharTokenizer(alphabet)
    model = build_model(load_config(TINY, [f"model.arch={arch}"]).model, tok, seed=seed, max_positions=320)
    return str(path), model, tok


# -- models and tokenizers ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_hf_dir_round_trip_tokenizer_and_logits(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, model, tok = tiny_hf_dir(tmp_path / "m", arch=arch)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(path))
    hf_tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    text = PRINTABLE + " 1+2="
    assert hf_tok(text)["input_ids"] == tok.encode(text)  # BOS + one token per character, same ids
    rendered = hf_tok.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True)
    assert hf_tok(rendered, add_special_tokens=False)["input_ids"] == tok.encode_prompt(MSGS)
    assert len(hf_tok) == tok.vocab_size
    # the trainer's view of the directory: same ids, same decoding
    h = HFTokenizer(path)
    assert h.encode_prompt(MSGS) == tok.encode_prompt(MSGS) and h.encode_prompt("1+2=") == tok.encode("1+2=")
    ids = tok.encode("x = \\boxed{7}", add_bos=False) + [tok.eos_token_id] + tok.encode("junk", add_bos=False)
    assert h.decode(ids) == tok.decode(ids) == "x = \\boxed{7}"
    assert (h.pad_token_id, h.eos_token_ids, h.bos_token_id) == (0, (1,), 2)
    # the model: transformers' loader and the trainer's give the original logits and the same greedy text
    x = torch.tensor([tok.encode_prompt(MSGS)])
    loaded = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    cfg = load_config(None, [f"model.path={path}"])
    policy = load_policy(cfg, h)
    with torch.no_grad():
        ref = model(x).logits
        assert torch.equal(loaded(x).logits, ref) and torch.equal(policy(x).logits, ref)
        g1 = loaded.generate(x, max_new_tokens=6, do_sample=False)
        g2 = model.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=1)
    assert torch.equal(g1, g2)


def test_model_dir_sampling_defaults_do_not_leak_into_the_rollout(tmp_path):
    path, _, _ = tiny_hf_dir(tmp_path / "m")
    with open(os.path.join(path, "generation_config.json")) as f:
        gc = json.load(f)
    gc.update(top_p=0.5, top_k=3, repetition_penalty=1.5, eos_token_id=[1, 7])
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(gc, f)
    h = HFTokenizer(path)
    assert h.eos_token_ids == (1, 7)  # a chat model's end-of-turn token ends responses too
    model = load_policy(load_config(None, [f"model.path={path}"]), h, dtype="bf16")
    g = model.generation_config
    assert g.top_p in (None, 1.0) and g.repetition_penalty in (None, 1.0) and g.top_k in (None, 50)  # unset
    assert g.eos_token_id == [1, 7]
    assert model.dtype == torch.bfloat16


def test_arith_tokenizer_exports_too(tmp_path):
    from transformers import AutoTokenizer

    path, _, tok = tiny_hf_dir(tmp_path / "a", alphabet="0123456789+=")
    hf_tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert hf_tok("3+4=")["input_ids"] == tok.encode("3+4=") and len(hf_tok) == tok.vocab_size


def test_model_path_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="model.path: no such directory"):
        load_config(None, [f"model.path={tmp_path / 'nope'}"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "weights.bin").write_text("x")
    with pytest.raises(ConfigError, match=r"model.path: .*has no config.json.*weights.bin"):
        load_config(None, [f"model.path={tmp_path / 'empty'}"])


def _strip_chat_template(path):
    for name in ("chat_template.jinja", "chat_template.json"):
        if os.path.exists(os.path.join(path, name)):
            os.remove(os.path.join(path, name))
    cfg_file = os.path.join(path, "tokenizer_config.json")
    with open(cfg_file) as f:
        tc = json.load(f)
    tc.pop("chat_template", None)
    with open(cfg_file, "w") as f:
        json.dump(tc, f)


def test_tokenizer_without_chat_template_is_a_clear_error_before_any_actor(tmp_path):
    path, _, _ = tiny_hf_dir(tmp_path / "m")
    _strip_chat_template(path)
    cfg = load_config(TINY, [f"model.path={path}", f"data.train_files=[{SAMPLE}]", "trainer.progress=none",
                             f"trainer.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match=r"model.path: the tokenizer in .* has no chat template"):
        load_prompts(cfg, make_tokenizer(cfg))
    from vespo_trainer.loops.run import train

    with pytest.raises(ConfigError, match="no chat template"):
        train(cfg)  # fails in the preflight: no Ray session, no actor
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")
    assert cli.main(["train", "--dry-run", f"model.path={path}", f"data.train_files=[{SAMPLE}]"]) == 2


# -- config ------------------------------------------------------------------------------------------------
def test_task_follows_train_files_and_reward_function_names():
    assert load_config().task.name == "arith"
    cfg = load_config(None, [f"data.train_files=[{SAMPLE}]"])
    assert cfg.task.name == "dataset" and os.path.isabs(cfg.data.train_files[0])
    with pytest.raises(ConfigError, match="task.name: 'dataset' needs data.train_files"):
        load_config(None, ["task.name=dataset"])
    with pytest.raises(ConfigError, match="data.train_files: .*task.name is 'arith'"):
        load_config(None, ["task.name=arith", f"data.train_files=[{SAMPLE}]"])
    with pytest.raises(ConfigError, match="data.train_files: no such file"):
        load_config(None, ["data.train_files=[/nonexistent/x.parquet]"])
    for ok in ("arith", "math", "my_pkg.rewards:score"):
        assert load_config(None, [f"reward.function={ok}"]).reward.function == ok
    with pytest.raises(ConfigError, match="reward.fn"):  # the old name is gone, and says so
        load_config(None, ["reward.fn=math"])


# -- data ----------------------------------------------------------------------------------------------------
def _jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_prepare_question_answer_jsonl(tmp_path, capsys):
    src = _jsonl(tmp_path / "qa.jsonl", [
        {"question": "What is 2+3?", "answer": "5"},
        {"problem": "Half of one?", "solution": "It is \\boxed{\\frac{1}{2}} clearly."},
        {"question": "Tom has 3 apples and buys 4.", "answer": "He has 3+4=7 apples.\n#### 7"},
        {"question": "No answer here", "answer": ""},
        {"question": 12, "answer": 4}])
    out = tmp_path / "out.parquet"
    counts = prepare(src, str(out), data_source="toy")
    assert counts == {"read": 5, "written": 3, "skipped": 2}
    assert "5 rows read, 3 written" in capsys.readouterr().out
    rows, columns = read_rows(str(out))
    assert set(columns) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["5", "\\frac{1}{2}", "7"]
    assert rows[0]["prompt"] == [{"role": "user", "content": "What is 2+3? Please reason step by step, and put "
                                                              "your final answer within \\boxed{}."}]
    assert all(r["data_source"] == "toy" for r in rows) and [r["extra_info"]["index"] for r in rows] == [0, 1, 2]


def test_prepare_normalises_a_verl_schema_parquet_and_the_cli(tmp_path):
    src = tmp_path / "dapo.parquet"
    write_parquet([{"data_source": "math_dapo", "prompt": [{"content": "Find x. Answer: $x$", "role": "user"}],
                    "ability": "MATH", "reward_model": {"ground_truth": "34", "style": "rule-lean"},
                    "extra_info": {"index": "a-1"}},
                   {"data_source": "math_dapo", "prompt": [{"content": "Find y.", "role": "user"}],
                    "ability": "MATH", "reward_model": {"ground_truth": "12", "style": "rule-lean"},
                    "extra_info": {"index": "a-2"}}], str(src))
    out = tmp_path / "norm.parquet"
    proc = subprocess.run([sys.executable, "-m", "vespo_trainer", "data", "prepare", "--input", str(src),
                           "--output", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "veRL schema" in proc.stdout and "2 written" in proc.stdout
    rows, _ = read_rows(str(out))
    assert rows[0]["prompt"] == [{"role": "user", "content": "Find x. Answer: $x$"}]
    assert rows[0]["reward_model"] == {"style": "rule-lean", "ground_truth": "34"}
    assert rows[1]["extra_info"] == {"index": "a-2"} and rows[1]["ability"] == "MATH"


def test_prepare_errors_name_the_columns(tmp_path, capsys):
    src = _jsonl(tmp_path / "bad.jsonl", [{"text": "hi", "label": 1}])
    with pytest.raises(DataError, match=r"columns found: \['text', 'label'\]"):
        prepare(src, str(tmp_path / "o.parquet"))
    assert cli.main(["data", "prepare", "--input", src, "--output", str(tmp_path / "o.parquet")]) == 2
    assert "columns found" in capsys.readouterr().err
    bad_gt = tmp_path / "bad_gt.parquet"
    write_parquet([{"prompt": [{"role": "user", "content": "q"}], "reward_model": {"ground_truth": [1, 2]}}],
                  str(bad_gt))
    with pytest.raises(DataError, match="ground_truth must be a string or a number"):
        prepare(str(bad_gt), str(tmp_path / "o2.parquet"))


def test_training_files_missing_columns_fail_before_training(tmp_path):
    bad = tmp_path / "flat.parquet"
    write_parquet([{"question": "What is 1+1?", "answer": "2"}], str(bad))
    cfg = load_config(TINY, [f"data.train_files=[{bad}]"])
    with pytest.raises(DataError, match=r"missing column\(s\) \['prompt', 'reward_model'\].*columns found: "
                                        r"\['question', 'answer'\]"):
        load_prompts(cfg, make_tokenizer(cfg))


def test_dataset_prompts_drop_long_ones_with_a_count(tmp_path):
    lines = []
    cfg = load_config(TINY, [f"data.train_files=[{SAMPLE}]", "data.max_prompt_length=130"])
    tok = make_tokenizer(cfg)
    prompts = load_dataset_prompts(cfg.data, tok, log=lines.append)
    rows, _ = read_rows(SAMPLE)
    lengths = [len(tok.encode_prompt(r["prompt"])) for r in rows]
    kept = [r for r, n in zip(rows, lengths) if n <= 130]
    assert 0 < len(prompts) == len(kept) < len(rows)
    assert f"{len(rows) - len(kept)} of {len(rows)} dropped" in lines[0]
    p = prompts[0]
    assert p.chat == tuple(kept[0]["prompt"]) and p.text == kept[0]["prompt"][0]["content"]
    assert p.ground_truth == kept[0]["reward_model"]["ground_truth"] and p.data_source == "vespo/math_sample"
    assert [q.prompt_id for q in prompts] == list(range(len(prompts)))
    with pytest.raises(DataError, match="no prompts left"):
        load_dataset_prompts(load_config(TINY, [f"data.train_files=[{SAMPLE}]", "data.max_prompt_length=5"]).data,
                             tok, log=lines.append)


def test_shipped_math_sample_is_what_its_script_writes(tmp_path):
    out = tmp_path / "again.parquet"
    subprocess.run([sys.executable, os.path.join(ROOT, "examples", "data", "make_math_sample.py"), str(out)],
                   check=True, capture_output=True, timeout=120)
    a, b = read_rows(SAMPLE)[0], read_rows(str(out))[0]
    assert a == b and len(a) == 300 and os.path.getsize(SAMPLE) < 64 * 1024
    assert all(set(r["prompt"][0]["content"]) <= set(PRINTABLE) for r in a)
    # every ground truth is a correct answer to the math reward when boxed, and a wrong one off by one
    for r in a[:30]:
        gt = r["reward_model"]["ground_truth"]
        assert compute_score("s", f"so the answer is \\boxed{{{gt}}}", gt) == 1.0
        assert compute_score("s", f"\\boxed{{{gt}+1}}", gt) == 0.0


# -- the math reward ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("response, truth, score", [
    ("so x = \\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{\\frac12}", "1/2", 1.0),
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", 1.0),
    ("\\boxed{1+x^2}", "x^2+1", 1.0),
    ("The answer is 72", "72", 1.0),
    ("first \\boxed{5}, no wait: \\boxed{10}", "10", 1.0),   # the LAST boxed answer counts
    ("first \\boxed{10}, no wait: \\boxed{5}", "10", 0.0),
    ("\\boxed{4}", "3", 0.0),
    ("\\boxed{\\frac{1}{3}}", "0.33", 0.0),
    ("", "3", 0.0),
    ("__import__('os').system('true')", "0", 0.0),
])
def test_math_reward_known_answers(response, truth, score):
    assert compute_score("math", response, truth, None) == score


def test_last_boxed_and_unparsable_truth():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{x^{2}}") == "x^{2}"
    assert last_boxed("\\boxed{open") is None and last_boxed("none") is None
    with pytest.raises(ValueError, match="cannot parse the ground truth"):
        compute_score("math", "\\boxed{1}", "}{")


def test_unimportable_reward_function_fails_before_any_actor(tmp_path):
    from vespo_trainer.loops.run import train

    cfg = load_config(TINY, ["reward.function=no_such_pkg.rewards:score", "trainer.progress=none",
                             f"trainer.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="reward.function: 'no_such_pkg.rewards:score' cannot be imported"):
        train(cfg)
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_dry_run_of_a_dataset_run(tmp_path, capsys):
    path, _, _ = tiny_hf_dir(tmp_path / "m")
    assert cli.main(["train", "--dry-run", f"data.train_files=[{SAMPLE}]", f"model.path={path}",
                     "data.max_prompt_length=130"]) == 0
    out = capsys.readouterr().out
    n = len(load_prompts(load_config(None, [f"data.train_files=[{SAMPLE}]", f"model.path={path}",
                                            "data.max_prompt_length=130"]), HFTokenizer(path), log=lambda s: None))
    assert f"task dataset ({n} prompts of 1 file(s)), reward math" in out and 0 < n < 300
    assert f"model         {path} (transformers, local files)" in out
