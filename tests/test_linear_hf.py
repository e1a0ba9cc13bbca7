"""vespo_ext.integrations.hf: a tiny Hugging Face Qwen2 model (V = 8192) trained a few steps with the fused
linear + loss (backbone hidden states + head weight) and with model(...).logits + policy_loss: the same
losses and weights (tolerance below), untied and tied embeddings."""
from __future__ import annotations

import copy

import pytest
import torch

import vespo_ext
from vespo_ext.integrations import hf

transformers = pytest.importorskip("transformers")

V, B, P, L = 8192, 4, 5, 7  # vocabulary, responses, prompt and response lengths
LOSS_TOL = (1e-5, 2e-6)  # per step: relative, absolute (measured: <= 4e-7 absolute)
WEIGHT_ATOL = 5e-6  # max |w_fused - w_unfused| after 3 AdamW steps, lr 1e-3 (measured: <= 4e-7)


def _model(tied: bool):
    cfg = transformers.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied, initializer_range=0.1)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(cfg).float()


def _batch(model):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, P + L), generator=g)
    am = torch.ones(B, P + L, dtype=torch.long)
    am[1, :2] = 0  # left padding of a shorter prompt
    am[3, :1] = 0
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    resp = ids[:, P:]
    rmask = torch.ones(B, L, dtype=torch.bool)
    rmask[2, 5:] = False  # a response that ended early
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=am, position_ids=pos, logits_to_keep=L + 1).logits[:, :-1]
        lp = vespo_ext.token_logprobs(logits, resp)
    old = lp + 0.05 * torch.randn(B, L, generator=g)
    adv = torch.tensor([1.0, -0.5, 0.7, -1.2])
    return dict(input_ids=ids, attention_mask=am, position_ids=pos, responses=resp, old_logp=old, advantages=adv,
                response_mask=rmask)


def _unfused(model, b, **kw):
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                   logits_to_keep=L + 1, use_cache=False).logits[:, :-1]
    return vespo_ext.policy_loss(logits, b["responses"], b["old_logp"], b["advantages"], b["response_mask"], **kw)


def _fused(model, b, **kw):
    return hf.response_policy_loss(model, b["input_ids"], b["attention_mask"], b["responses"], b["old_logp"],
                                   b["advantages"], b["response_mask"], position_ids=b["position_ids"],
                                   chunk_tokens=5, **kw)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_training_steps_fused_equals_unfused(tied):
    base = _model(tied)
    assert hf.use_fused_linear("auto", base) and hf.linear_head(base) is not None
    b = _batch(base)
    runs = {}
    for name, fn in (("unfused", _unfused), ("fused", _fused)):
        model = copy.deepcopy(base)
        if tied:
            assert model.lm_head.weight is model.model.embed_tokens.weight
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for step in range(3):
            opt.zero_grad()
            loss = fn(model, b, loss="vespo", temperature=0.9, rollout_is_weights=None)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        runs[name] = (losses, {k: v.detach().clone() for k, v in model.state_dict().items()})
    (lu, wu), (lf, wf) = runs["unfused"], runs["fused"]
    for s, (a, c) in enumerate(zip(lu, lf)):
        assert abs(a - c) <= LOSS_TOL[0] * abs(a) + LOSS_TOL[1], f"step {s}: unfused {a} vs fused {c}"
    assert lu[0] != lu[-1]  # the steps changed the loss
    for k in wu:
        err = float((wu[k] - wf[k]).abs().max())
        assert err <= WEIGHT_ATOL, f"{k}: max |diff| {err:.3g}"
    assert any(float((wu[k] - base.state_dict()[k]).abs().max()) > 100 * WEIGHT_ATOL for k in wu)  # weights moved


def test_fused_linear_setting():
    model = _model(False)
    assert hf.use_fused_linear("false", model) is False
    assert hf.use_fused_linear(True, model) is True
    with pytest.raises(ValueError, match="fused_linear must be auto, true or false"):
        hf.use_fused_linear("yes", model)
    small = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1))
    assert hf.use_fused_linear("auto", small) is False  # V < 8192
    assert hf.use_fused_linear("true", small) is True
    model.config.final_logit_softcapping = 30.0  # logits are not lm_head(hidden) any more
    assert hf.linear_head(model) is None and hf.use_fused_linear("auto", model) is False
    with pytest.raises(ValueError, match="no plain nn.Linear head"):
        hf.use_fused_linear("true", model)


def test_wrapped_models_keep_their_forward():
    """A DDP / FSDP wrapper (multi-GPU TRL via accelerate) or a ZeRO-3 head must take the model's own forward:
    calling the backbone directly skips DDP's prepare_for_backward (no gradient all-reduce, replicas diverge)
    or FSDP's / ZeRO-3's unsharding. Instances made without __init__: isinstance is what is checked."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    model = _model(False)
    assert hf.needs_wrapped_forward(model, model) is False
    for kind in (DistributedDataParallel, FullyShardedDataParallel):
        assert hf.needs_wrapped_forward(kind.__new__(kind), model) is True
    model.lm_head.weight.ds_id = 7  # what DeepSpeed's zero.Init puts on a ZeRO-3 parameter
    assert hf.needs_wrapped_forward(model, model) is True


def test_trainer_config_key():
    config = pytest.importorskip("vespo_trainer.config")
    assert config.load_config().actor.fused_linear == "auto"
    for v in ("true", "false", "auto", "True"):
        assert config.load_config(overrides=[f"actor.fused_linear={v}"]).actor.fused_linear == v.lower()
    with pytest.raises(config.ConfigError, match="actor.fused_linear"):
        config.load_config(overrides=["actor.fused_linear=maybe"])
    with pytest.raises(config.ConfigError, match="actor.fused_linear: true needs zero_stage < 3"):
        config.load_config(overrides=["actor.fused_linear=true", "actor.zero_stage=3"])
