"""The learner as a DeepSpeed world of 2 Ray actors (gloo on CPU) against the same learner with 1 rank.

The same batches go to a 1-rank learner (ZeRO-1, the reference) and to 2-rank learners with ZeRO-0, 1,
2 and 3: every rank trains on half of each mini-batch with the loss divided by the mini-batch's
global normaliser and scaled by 2 for DeepSpeed's averaging, so the warm-up and RL loss curves, the merged metrics,
the provenance and the weights must match the reference. They match up to floating-point reduction
order, not bit for bit: the 2-rank gradient is the sum of two half-batch gradients added by gloo
(and, under ZeRO-3, reduce-scattered) instead of one backward over all rows, and the micro-batch
losses add up in another order; in fp32 that moves the 6th-7th significant digit, which Adam and
4 optimizer steps carry along. Hence a relative tolerance of 1e-4: the largest observed relative
difference is 1.4e-5, on quantities that are sums with cancellation (the loss, the mean log W).

Also: ZeRO-3's weight sync gathers bucket by bucket (never the whole model), sharded checkpoints
save and load on 2 ranks and resume gives the same next step, a checkpoint refuses another world
size, and a rank that dies fails the next call instead of hanging it.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from trainer_test_utils import load_tiny

STEPS = 2  # train_batch calls; each takes N = 4 / 2 = 2 optimizer steps
TOL = dict(rel_tol=1e-4, abs_tol=1e-6)
BUCKET_MB = 0.01  # ~10 KiB: the tiny model (44 KB) travels in ~5 buckets


def _cfg(tmp_path, stage: int, world: int):
    # 2 prompts x 4 responses = 8 rows per mini-batch: 4 per rank, in micro-batches of 2 (accumulation);
    # TIS: old log-probs recomputed by the learner, so the mismatch metrics are merged too
    return load_tiny(tmp_path, "trainer.device=cpu", f"actor.zero_stage={stage}", f"actor.num_workers={world}",
                     "actor.num_cpus=0.5", "actor.ppo_mini_batch_size=2", "actor.micro_batch_size=2",
                     "actor.zero3_persist_numel=0", "algorithm.tis=true", "actor.lr=0.01",
                     # token rejection too: the kept mask (and so the normaliser) is the same on 1 and 2 ranks
                     "algorithm.rollout_correction.rollout_rs=token_k1",
                     "algorithm.rollout_correction.rollout_rs_threshold=0.2_5.0")


def _batch(cfg, seed: int) -> dict:
    """A rollout-like batch: 4 prompts x 4 responses of 1-3 tokens, behaviour log-probs off the policy."""
    from vespo_trainer.batch import group_advantages
    from vespo_trainer.data.arith import arith_prompts
    from vespo_trainer.tokenizer import make_tokenizer

    tok = make_tokenizer()
    g = torch.Generator().manual_seed(seed)
    prompts = arith_prompts(9, 9)
    n, P = cfg.rollout.n, cfg.data.train_batch_size
    B, L = P * n, 3
    pick = torch.randint(len(prompts), (P,), generator=g)
    p_ids, p_am = tok.pad_left([tok.encode(prompts[int(i)].text) for i in pick for _ in range(n)])
    digits = torch.tensor(tok.encode("0123456789", add_bos=False))
    responses = digits[torch.randint(10, (B, L), generator=g)]
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    mask = torch.arange(L)[None] < lengths[:, None]
    responses = responses.masked_fill(~mask, tok.pad_token_id)
    return {"input_ids": torch.cat([p_ids, responses], 1), "attention_mask": torch.cat([p_am, mask.long()], 1),
            "responses": responses, "response_mask": mask,
            "old_logp": (-3.0 + 0.5 * torch.randn(B, L, generator=g)).masked_fill(~mask, 0.0),
            "token_version": torch.zeros(B, L, dtype=torch.long), "uid": torch.arange(seed * 100, seed * 100 + B),
            "prompt_id": pick.repeat_interleave(n),
            "advantages": group_advantages(torch.randint(2, (B,), generator=g).float(), n)}


def _weights(pub) -> dict:
    import ray

    from vespo_trainer.weight_sync import unpack_bucket

    return {name: t.clone() for ref in pub["refs"] for name, t in unpack_bucket(ray.get(ref))}


def _train(group, batches, save_at=None, ckpt_dir=None):
    """A format warm-up (2 steps of 8 pairs), one train_batch call per batch, a weight sync:
    (warm-up losses, [train_batch answers], published weights, publish answer)."""
    import random

    import ray

    from vespo_trainer.data.arith import arith_prompts, warmup_texts

    rng = random.Random(0)
    pairs = [warmup_texts(arith_prompts(9, 9), 8, rng) for _ in range(2)]
    warm = ray.get(group.warmup.remote(pairs), timeout=300)["warmup/losses"]
    outs = []
    for i, b in enumerate(batches):
        if i == save_at:
            ray.get(group.save.remote(ckpt_dir, "step_1"))
        outs.append(ray.get(group.train_batch.remote(b), timeout=300))
    pub = ray.get(group.publish_weights.remote(BUCKET_MB), timeout=300)
    return warm, outs, _weights(pub), pub


def _assert_same_warmup(got, ref, what):
    assert len(got) == len(ref) == 2, what
    for a, b in zip(got, ref):
        assert math.isclose(a, b, **TOL), f"{what}: warm-up loss {a} vs 1 rank {b}"


def _assert_same_run(got, ref, what, skip=()):
    for step, (a, b) in enumerate(zip(got, ref)):
        assert a["provenance"] == b["provenance"], f"{what}: provenance of call {step} differs"
        keys = {k for k in b["metrics"] if not k.startswith("time/") and k not in skip}
        assert keys == {k for k in a["metrics"] if not k.startswith("time/")}, what
        for k in sorted(keys):
            va, vb = a["metrics"][k], b["metrics"][k]
            assert math.isclose(va, vb, **TOL), f"{what}, call {step}: {k} = {va} vs 1 rank {vb}"


def _assert_same_weights(got, ref, what):
    """Within 1e-6 (observed ~3e-8), except the attention key bias: a constant added to all keys of
    a query shifts all its scores alike, so softmax ignores it and its exact gradient is 0; what is
    left is rounding noise, which Adam rescales towards lr-sized steps (observed 1e-6 - 5e-6)."""
    assert list(got) == list(ref), what
    for name in ref:
        atol = 1e-4 if name.endswith("k_proj.bias") else 1e-6
        assert torch.allclose(got[name], ref[name], rtol=1e-4, atol=atol), \
            f"{what}: {name} differs by {(got[name] - ref[name]).abs().max():.2e}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_cluster):
    """The 1-rank run (ZeRO-1); its learner stays up for the wrong-world-size check."""
    from vespo_trainer.learner.group import LearnerGroup

    cfg = _cfg(tmp_path_factory.mktemp("ref"), 1, 1)
    batches = [_batch(cfg, s) for s in range(STEPS)]
    group = LearnerGroup(cfg, {"num_cpus": 0.5, "num_gpus": 0})
    warm, outs, weights, _ = _train(group, batches)
    yield {"batches": batches, "warm": warm, "outs": outs, "weights": weights, "group": group}
    group.kill()


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_two_ranks_zero012_match_one_rank(stage, reference, tmp_path):
    from vespo_trainer.learner.group import LearnerGroup

    group = LearnerGroup(_cfg(tmp_path, stage, 2), {"num_cpus": 0.5, "num_gpus": 0})
    try:
        warm, outs, weights, _ = _train(group, reference["batches"])
    finally:
        group.kill()
    _assert_same_warmup(warm, reference["warm"], f"ZeRO-{stage} x2")
    # DeepSpeed reports no gradient norm without ZeRO (it clips, but keeps no norm), with 1 rank or 2
    _assert_same_run(outs, reference["outs"], f"ZeRO-{stage} x2", skip=("actor/grad_norm",) if stage == 0 else ())
    _assert_same_weights(weights, reference["weights"], f"ZeRO-{stage} x2")


def test_two_ranks_zero3_match_one_rank_sync_and_checkpoint(reference, tmp_path):
    import ray

    from vespo_trainer.learner.group import LearnerFailed, LearnerGroup

    cfg = _cfg(tmp_path, 3, 2)
    ckpt_dir = str(tmp_path / "ckpt")
    batches = reference["batches"]
    group = LearnerGroup(cfg, {"num_cpus": 0.5, "num_gpus": 0})
    try:
        assert ray.get(group.info.remote())["world_size"] == 2
        warm, outs, weights, pub = _train(group, batches, save_at=1, ckpt_dir=ckpt_dir)  # saves between calls
    finally:
        group.kill()
    _assert_same_warmup(warm, reference["warm"], "ZeRO-3 x2")
    _assert_same_run(outs, reference["outs"], "ZeRO-3 x2")
    # provenance: every row of every batch exactly once, in the batch's order, with its mini-batch
    for out, b in zip(outs, batches):
        prov = out["provenance"]
        assert prov["uid"] == b["uid"].tolist() and prov["minibatch"] == [0] * 8 + [1] * 8
    # weight sync from ZeRO-3: the 1-rank weights, gathered one bucket at a time
    _assert_same_weights(weights, reference["weights"], "ZeRO-3 x2 weight sync")
    full_mb = sum(t.numel() * t.element_size() for t in weights.values()) / 2**20
    assert pub["buckets"] >= 4 and len(pub["refs"]) == pub["buckets"]
    assert pub["resident_peak_mb"] < 0.5 * full_mb, (pub["resident_peak_mb"], full_mb)

    # sharded checkpoint: one optimizer-state and one model-state file per rank
    files = os.listdir(os.path.join(ckpt_dir, "step_1"))
    assert sum("optim_states" in f for f in files) == 2 and sum("model_states" in f for f in files) == 2, files
    # resume: a fresh 2-rank world loads it and its next call repeats the original second call
    again = LearnerGroup(cfg, {"num_cpus": 0.5, "num_gpus": 0})
    try:
        assert ray.get(again.load.remote(ckpt_dir, "step_1")) == 2  # version: 2 optimizer steps
        resumed = ray.get(again.train_batch.remote(batches[1]), timeout=300)
        _assert_same_run([resumed], outs[1:], "ZeRO-3 x2 after load")
        # a checkpoint of 2 ranks does not load into 1 rank: a clear error, not DeepSpeed's
        with pytest.raises(Exception, match="saved by 2 learner ranks .* actor.num_workers=1"):
            ray.get(reference["group"].load.remote(ckpt_dir, "step_1"), timeout=120)
        # a rank that dies fails the next call (naming the rank) instead of hanging it
        ray.kill(again.ranks[1])
        with pytest.raises(Exception, match="learner rank 1 of 2 failed in train_batch: .*Actor") as err:
            ray.get(again.train_batch.remote(batches[0]), timeout=120)
        assert isinstance(err.value, LearnerFailed), type(err.value)
    finally:
        again.kill()



def test_published_buckets_hold_only_their_tensors(ray_cluster):
    """ZeRO 1-2 make every parameter a view into one flat buffer; a view pickles its whole storage, so
    each bucket must carry only its own bytes (before this check: 9.4 GB through the object store and
    79 s to publish a 128 MiB model in 16 MiB buckets)."""
    import ray

    from vespo_trainer.weight_sync import publish

    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64, bias=False) for _ in range(4)])
    flat = torch.zeros(4 * 64 * 64)
    with torch.no_grad():
        for i, lin in enumerate(model):
            flat[i * 4096:(i + 1) * 4096] = lin.weight.reshape(-1)
            lin.weight.data = flat[i * 4096:(i + 1) * 4096].view(64, 64)  # as DeepSpeed's ZeRO 1-2 do
    stats = {}
    refs = publish(model, 16 / 1024, stats=stats)  # 16 KiB: one 16 KiB weight per bucket
    assert stats["buckets"] == len(refs) == 4
    from vespo_trainer.weight_sync import unpack_bucket

    for i, ref in enumerate(refs):
        packed = ray.get(ref)
        assert packed["data"].nbytes == 64 * 64 * 4
        (name, t), = unpack_bucket(packed)
        assert torch.equal(t, model[i].weight), name


# -- without Ray: the config checks, the resource plan and the dry-run text of a multi-rank learner --------
@pytest.mark.parametrize("overrides, key, words", [
    (["actor.num_workers=0"], "actor.num_workers", ">= 1"),
    (["actor.num_workers=3"], "actor.num_workers", "8 x 8 = 64 responses must split evenly over the 3"),
    (["actor.num_workers=2", "actor.micro_batch_size=64"], "actor.micro_batch_size",
     "must divide each learner rank's 32 of the mini-batch's"),
    (["actor.num_workers=2", "task.warmup_batch_size=3"], "task.warmup_batch_size", "split evenly"),
])
def test_world_config_errors(overrides, key, words):
    from vespo_trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(key) and words in str(err.value), str(err.value)


@pytest.mark.parametrize("loss", ["vespo", "grpo"])
def test_metrics_of_parts_merge_to_the_metrics_of_the_whole(loss):
    """Counts add, max/min, means weighted by what they average over, pooled std: the op's metrics of
    a batch equal the merge of its parts' (uneven parts, one of them with no counted token)."""
    import vespo_ext
    from vespo_trainer.learner.metrics import merge_loss_metrics

    g = torch.Generator().manual_seed(0)
    B, L, V = 12, 5, 11
    logits, labels = torch.randn(B, L, V, generator=g), torch.randint(V, (B, L), generator=g)
    old = -2.4 + 0.6 * torch.randn(B, L, generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, L, generator=g) < 0.7
    mask[8:10] = False  # the third part counts nothing

    def metrics(rows):
        _, m = vespo_ext.policy_loss(logits[rows], labels[rows], old[rows], adv[rows], mask[rows], loss=loss,
                                     return_metrics=True)
        return {k: float(v) for k, v in m.items()}

    whole = metrics(slice(0, B))
    merged = merge_loss_metrics([metrics(slice(0, 3)), metrics(slice(3, 8)), metrics(slice(8, 10)),
                                 metrics(slice(10, 12))])
    assert merged.keys() == whole.keys()
    for k in whole:
        assert math.isclose(merged[k], whole[k], rel_tol=1e-5, abs_tol=1e-6), (k, merged[k], whole[k])
    assert whole["n_seq"] == 10 and whole["w_seq_std"] > 0 and whole["w_seq_max"] > whole["w_seq_min"]


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("loss", ["vespo", "gspo"])
def test_rank_losses_with_the_global_normaliser_add_up_to_the_whole(loss, agg):
    """What makes W ranks equal 1 rank, for every aggregation: the losses of the row shards, each
    divided by Learner._norm of the whole mini-batch, sum to the op's loss of the whole mini-batch,
    and so do their gradients."""
    import types

    import vespo_ext
    from vespo_trainer.config import load_config
    from vespo_trainer.learner.rank import Learner

    g = torch.Generator().manual_seed(1)
    B, L, V = 8, 6, 13
    logits = torch.randn(B, L, V, generator=g, requires_grad=True)
    labels, old = torch.randint(V, (B, L), generator=g), -2.5 + 0.5 * torch.randn(B, L, generator=g)
    adv, mask = torch.randn(B, generator=g), torch.rand(B, L, generator=g) < 0.6
    mask[5] = False
    rank = types.SimpleNamespace(gas=1, world=2, cfg=load_config(None, [f"algorithm.loss={loss}",
                                                                        f"algorithm.agg={agg}"]))
    norm = Learner._norm(rank, mask)
    kw = dict(loss=loss, agg=agg)
    whole = vespo_ext.policy_loss(logits, labels, old, adv, mask, **kw)
    (g_whole,) = torch.autograd.grad(whole, logits)
    parts = sum(vespo_ext.policy_loss(logits[r], labels[r], old[r], adv[r], mask[r], norm=norm, **kw)
                for r in (slice(0, 4), slice(4, 8)))
    (g_parts,) = torch.autograd.grad(parts, logits)
    whole, parts = float(whole.detach()), float(parts.detach())
    assert whole != 0 and math.isclose(parts, whole, rel_tol=1e-5, abs_tol=1e-7)
    assert torch.allclose(g_parts, g_whole, rtol=1e-5, atol=1e-7)


def test_resources_count_every_rank(monkeypatch):
    from vespo_trainer.cluster import plan_resources
    from vespo_trainer.config import load_config

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config(None, ["trainer.device=cpu", "actor.num_workers=2", "actor.num_cpus=0.5"])
    assert plan_resources(cfg, {"CPU": 2.0})["learner"] == {"num_cpus": 0.5, "num_gpus": 0.0}
    with pytest.raises(RuntimeError, match="need 2.75 CPUs"):  # 2 x 1 + 0.5 + 0.25
        plan_resources(load_config(None, ["trainer.device=cpu", "actor.num_workers=2"]), {"CPU": 2.0})
    gpu = load_config(None, ["trainer.device=cuda", "actor.num_workers=2"])
    whole = plan_resources(gpu, {"CPU": 8.0, "GPU": 3.0})  # one GPU per rank and per rollout worker
    assert whole["learner"]["num_gpus"] == whole["rollout"]["num_gpus"] == 1.0
    shared = plan_resources(gpu, {"CPU": 8.0, "GPU": 2.0})  # > 1/2 per rank: never two NCCL ranks on one GPU
    lg, rg = shared["learner"]["num_gpus"], shared["rollout"]["num_gpus"]
    assert lg > 0.5 and 0 < rg <= 1 - lg
    with pytest.raises(RuntimeError, match="one GPU per rank"):
        plan_resources(load_config(None, ["trainer.device=cuda", "actor.num_workers=2", "actor.num_gpus=0.5"]),
                       {"CPU": 8.0, "GPU": 2.0})


def test_dry_run_shows_the_world_size(capsys):
    from vespo_trainer import cli

    assert cli.main(["train", "--dry-run", "actor.num_workers=4", "actor.zero_stage=3",
                     "actor.micro_batch_size=4"]) == 0
    out = capsys.readouterr().out
    assert "learner x4 (DeepSpeed ZeRO-3, world size 4: 16 responses per rank per mini-batch" in out
    assert "micro-batch 4 (gradient accumulation 4 on each of 4 learner ranks)" in out
