"""TRL adapter, fused-linear path: FusedGRPOTrainer with fused_linear="true" takes its per-token log-probs
from the backbone's hidden states and lm_head.weight (vespo_ext.linear_token_logprobs) and gives the
loss and parameter gradients of the same trainer on TRL's logits forward. Runs where TRL is installed
(tests/requirements-peers.txt), skips elsewhere."""
from __future__ import annotations

import types

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")

from test_peers import _trainer, _trl_inputs  # noqa: E402  (the peer tests' GRPOTrainer stub: no __init__)
from vespo_ext.integrations.trl import FusedGRPOTrainer  # noqa: E402

TEMP = 0.9


def _model(tied):
    cfg = transformers.Qwen2Config(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied,
                                   initializer_range=0.2)
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(cfg).float()


def _trl_forward(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
                 compute_aux_loss=False, **kwargs):
    """What TRL's _get_per_token_logps_and_entropies computes for a text model."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep + 1).logits
    logits = logits[:, :-1] / self.temperature
    lp = torch.log_softmax(logits.float(), -1)
    logps = lp.gather(-1, input_ids[:, -logits_to_keep:].unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropies = -(lp.exp() * lp).sum(-1)
    return logps, entropies, None


@pytest.mark.parametrize("loss_type", ["vespo", "dapo", "grpo"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fused_linear_equals_trl_forward(loss_type, tied):
    env = types.SimpleNamespace(args=trl.GRPOConfig(output_dir="/tmp/vespo-linear-trl", report_to=[], use_cpu=True))
    base = _model(tied)
    _, _, inputs = _trl_inputs(B=4, T=6)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    with torch.no_grad():
        t0 = types.SimpleNamespace(temperature=TEMP)
        lp0, _, _ = _trl_forward(t0, base, ids, torch.ones_like(ids), 6)
    inputs["old_per_token_logps"] = lp0 + 0.1 * torch.randn_like(lp0)
    out = {}
    for mode in ("false", "true"):
        model = _model(tied)
        t = _trainer(env, FusedGRPOTrainer, None, None, loss_type=loss_type, beta=0.0)
        t.temperature, t.fused_linear = TEMP, mode
        t._get_per_token_logps_and_entropies = types.MethodType(_trl_forward, t)
        if mode == "true":
            def not_called(self, *a, **k):
                raise AssertionError("the fused-linear path must not run TRL's logits forward")
            t._get_per_token_logps_and_entropies = types.MethodType(
                lambda self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                compute_entropy=False, compute_aux_loss=False: not_called(self), t)
        loss = t._compute_loss(model, inputs)
        loss.backward()
        out[mode] = (float(loss.detach()), {k: p.grad.clone() for k, p in model.named_parameters()},
                     {k: list(v) for k, v in t._metrics["train"].items()})
    (lu, gu, mu), (lf, gf, mf) = out["false"], out["true"]
    assert abs(lu - lf) <= 1e-5 * abs(lu) + 1e-7, (lu, lf)
    for k in gu:
        scale = float(gu[k].abs().max())
        assert float((gu[k] - gf[k]).abs().max()) <= 2e-4 * scale + 1e-9, k
    assert mu.keys() == mf.keys()
    for k in mu:
        assert mu[k] == pytest.approx(mf[k], rel=1e-4, abs=1e-6), k
