"""A dataset run end to end (real Ray + DeepSpeed on CPU): the shipped math sample, the math reward,
a local Hugging Face model directory as model.path; then `vespo export` and transformers reloading
the export with the learner's exact logits."""
from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("pyarrow")
pytest.importorskip("math_verify")

import torch  # noqa: E402
from test_data_models import SAMPLE, tiny_hf_dir  # noqa: E402
from trainer_test_utils import assert_finite_record, load_tiny  # noqa: E402

from vespo_trainer import cli  # noqa: E402

DATASET = [f"data.train_files=[{SAMPLE}]", "data.max_prompt_length=200", "rollout.max_new_tokens=6",
           "trainer.total_steps=2", "trainer.save_every=0", "data.train_batch_size=2", "actor.ppo_mini_batch_size=1"]


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f]


def _learner_logits(cfg, run_dir, tag, ids):
    """Logits of a fresh learner actor that loaded the run's DeepSpeed checkpoint (DeepSpeed's own loader)."""
    import ray

    from vespo_trainer.checkpoint import ckpt_root
    from vespo_trainer.learner.rank import Learner

    learner = ray.remote(Learner).options(num_cpus=0).remote(cfg)
    try:
        ray.get(learner.load.remote(ckpt_root(run_dir), tag), timeout=300)
        return ray.get(learner.logits.remote(ids), timeout=120)
    finally:
        ray.kill(learner)


def _check_export(cfg, run_dir, out, prompt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vespo_trainer.tokenizer import make_tokenizer

    assert cli.main(["export", str(run_dir), "--out", str(out), "--tag", "step_000002"]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    tok = make_tokenizer(cfg)
    hf_tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    rendered = hf_tok.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    ids = hf_tok(rendered, add_special_tokens=False)["input_ids"]
    assert ids == tok.encode_prompt(list(prompt))  # the export tokenizes as the trainer did
    x = torch.tensor([ids])
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    with torch.no_grad():
        exported = model(x).logits.float()
    learned = _learner_logits(cfg, run_dir, "step_000002", x)
    assert torch.equal(exported, learned), (exported - learned).abs().max()
    return model


def test_math_sample_with_a_local_hf_model_then_export(tmp_path, ray_cluster):
    from vespo_trainer.loops.run import train

    model_dir, _, _ = tiny_hf_dir(tmp_path / "init_model", seed=3)
    cfg = load_tiny(tmp_path / "run", f"model.path={model_dir}", "reward.function=math", "rollout.n=2", *DATASET)
    assert cfg.task.name == "dataset"
    run = train(cfg)
    recs = _records(run)
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        assert_finite_record(r)
        assert r["reward/errors"] == 0 and r["reward/timeouts"] == 0 and 0.0 <= r["reward/mean"] <= 1.0
        assert r["actor/version"] == 2 * r["step"]  # 2 optimizer steps per rollout step
    assert "model.path" not in open(os.path.join(run, "config.yaml")).read()  # (nested YAML)
    assert model_dir in open(os.path.join(run, "config.yaml")).read()
    from vespo_trainer.data.tasks import load_prompts
    from vespo_trainer.tokenizer import make_tokenizer

    prompt = load_prompts(cfg, make_tokenizer(cfg), log=lambda s: None)[0].chat
    _check_export(cfg, run, tmp_path / "export", prompt)


def test_math_sample_with_the_builtin_model_then_export(tmp_path, ray_cluster):
    """No model.path: the built-in tiny model with the printable-ASCII character tokenizer; the export
    converts that tokenizer into a Hugging Face one. A dotted-path reward with veRL's signature that a
    random policy often earns, so the exported weights are trained ones."""
    from vespo_trainer.data.tasks import load_prompts
    from vespo_trainer.loops.run import train
    from vespo_trainer.model import load_policy
    from vespo_trainer.tokenizer import make_tokenizer

    cfg = load_tiny(tmp_path / "run", *DATASET, "rollout.n=4", "reward.function=reward_doubles:has_digit",
                    "actor.zero_stage=3")  # export gathers the ZeRO-3 shards (the other test: ZeRO-1)
    run = train(cfg)
    recs = _records(run)
    assert len(recs) == 2 and all(r["reward/errors"] == 0 for r in recs)
    assert any(0 < r["reward/mean"] < 1 for r in recs)
    tok = make_tokenizer(cfg)
    prompt = load_prompts(cfg, tok, log=lambda s: None)[5].chat
    model = _check_export(cfg, run, tmp_path / "export", prompt)
    start = load_policy(cfg, tok)  # the seeded initial weights
    assert not torch.equal(start.model.embed_tokens.weight, model.model.embed_tokens.weight)
