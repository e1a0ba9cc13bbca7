"""vespo_ext.integrations.verl's fused-linear path (use_vespo_fused_linear) against veRL's own computation.

veRL's ``use_fused_kernels`` computes the log-probs and entropy from the last hidden states and
``lm_head.weight`` in a patched model forward (FusedLinearForPPO for the torch/liger backends,
linear_cross_entropy for triton). The drop-ins must give what veRL's unfused path gives from the full
logits (``logprobs_from_logits`` / ``entropy_from_logits`` of logits / temperature): values, and the
gradients to hidden states, head weight and (through a tiny Qwen2) every parameter. Needs veRL
(tests/requirements-peers.txt); skips without it.
"""
from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_grad_close

verl_F = pytest.importorskip("verl.utils.torch_functional")
verl_tf = pytest.importorskip("verl.utils.experimental.torch_functional")
verl_lce = pytest.importorskip("verl.utils.kernel.linear_cross_entropy")

import vespo_ext.integrations.verl as V  # noqa: E402  (after the skips: registers into veRL)

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}  # of the largest |reference| (values and gradients)


def _verl_unfused(hidden, weight, ids, temperature):
    """veRL's non-fused actor path: full logits, then logprobs_from_logits and entropy_from_logits."""
    logits = (hidden @ weight.t()).float() / temperature
    return verl_F.logprobs_from_logits(logits, ids), verl_F.entropy_from_logits(logits)


def _inputs(dtype, B=3, L=37, H=32, Vocab=1031, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, L, H, generator=g).to(dtype)
    w = (torch.randn(Vocab, H, generator=g) * (2.0 / math.sqrt(H))).to(dtype)
    ids = torch.randint(0, Vocab, (B, L), generator=g)
    c1, c2 = torch.randn(B, L, generator=g), torch.randn(B, L, generator=g)
    return h, w, ids, c1, c2


def _grads(fn, h, w, ids, c1, c2, temperature):
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    lp, ent = fn(hh, ww, ids, temperature)
    ((lp.reshape(c1.shape).float() * c1).sum() + (ent.reshape(c2.shape).float() * c2).sum()).backward()
    return lp.detach(), ent.detach(), hh.grad, ww.grad


@pytest.fixture
def patched():
    names = V.use_vespo_fused_linear(chunk_tokens=7)
    yield names
    V.use_vespo_fused_linear(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_linear_for_ppo_dropin(patched, dtype):
    """The FusedLinearForPPO veRL's torch backend builds, patched: values, entropy and both gradients
    equal veRL's unfused computation; the output dtypes are veRL's (log_probs fp32, entropy like hidden)."""
    assert verl_tf.FusedLinearForPPO is V.VespoFusedLinearForPPO
    h, w, ids, c1, c2 = _inputs(dtype)
    mod = verl_tf.FusedLinearForPPO(impl_backend="torch")
    ours = _grads(lambda a, b, i, t: mod(a, b, i, temperature=t), h, w, ids, c1, c2, 0.7)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype and ours[0].shape == ids.shape
    # veRL's unfused path; in float64 for bf16 inputs (veRL's own bf16 logits carry one more rounding)
    ref_dtype = torch.float32 if dtype == torch.float32 else torch.float64
    ref = _grads(_verl_unfused, h.to(ref_dtype), w.to(ref_dtype), ids, c1.to(ref_dtype), c2.to(ref_dtype), 0.7)
    for what, a, b in zip(("log_probs", "entropy", "d hidden", "d weight"), ours, ref):
        assert_grad_close(a, b, TOL[dtype], what=what)
    # and veRL's own chunked torch implementation (the class we replace) agrees as well
    theirs = _grads(lambda a, b, i, t: V._saved[f"{verl_tf.__name__}.FusedLinearForPPO"]()(a, b, i, t),
                    h.float(), w.float(), ids, c1, c2, 0.7)
    if dtype == torch.float32:
        for what, a, b in zip(("log_probs", "entropy", "d hidden", "d weight"), ours, theirs):
            assert_grad_close(a, b, TOL[dtype], what=f"{what} vs FusedLinearForPPO")


def test_linear_cross_entropy_dropin(patched):
    """veRL's triton-backend entry point, patched: flat (num_tokens,) float32 outputs, equal to the unfused
    path; reduction != "none" goes back to veRL's kernel."""
    h, w, ids, c1, c2 = _inputs(torch.float32, seed=1)
    fn = verl_lce.linear_cross_entropy
    ours = _grads(lambda a, b, i, t: fn(a, b, i, t, "none"), h, w, ids, c1, c2, 1.3)
    assert ours[0].shape == (ids.numel(),) and ours[0].dtype == ours[1].dtype == torch.float32
    ref = _grads(_verl_unfused, h, w, ids, c1, c2, 1.3)
    for what, a, b in zip(("log_probs", "entropy", "d hidden", "d weight"), ours, ref):
        assert_grad_close(a.reshape(b.shape), b, TOL[torch.float32], what=what)
    calls = []
    handoff = V._make_linear_cross_entropy(lambda *a: calls.append(a) or "veRL")
    assert handoff(h, w, ids, 1.0, "mean") == "veRL" and calls[0][4] == "mean"


def test_patch_and_restore():
    orig_cls, orig_fn = verl_tf.FusedLinearForPPO, verl_lce.linear_cross_entropy
    names = V.use_vespo_fused_linear()
    assert f"{verl_tf.__name__}.FusedLinearForPPO" in names and f"{verl_lce.__name__}.linear_cross_entropy" in names
    assert V.use_vespo_fused_linear() == names  # idempotent: patched once, the originals kept
    assert verl_lce.linear_cross_entropy.vespo_original is orig_fn
    assert V.use_vespo_fused_linear(False) == names
    assert verl_tf.FusedLinearForPPO is orig_cls and verl_lce.linear_cross_entropy is orig_fn
    with pytest.raises(ValueError, match="chunk_tokens"):
        V.use_vespo_fused_linear(chunk_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        V.fused_linear_logprobs(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long),
                                torch.ones(2))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_qwen2_model_forward(patched, backend):
    """A tiny Qwen2 with veRL's own fused-kernel forward patch (patch_forward_with_backends): output.log_probs
    and .entropy equal veRL's unfused computation from the original forward's logits, and so do the
    gradients of every parameter. (The triton backend cannot run on CPU without the drop-in.)"""
    transformers = pytest.importorskip("transformers")
    from verl.models.transformers.monkey_patch import patch_forward_with_backends

    cfg = transformers.Qwen2Config(vocab_size=2053, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False, initializer_range=0.1)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).float()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, cfg.vocab_size, (2, 19), generator=g)
    c1, c2 = torch.randn(2, 19, generator=g), torch.randn(2, 19, generator=g)
    temperature = 0.8

    def run(fwd):
        model.zero_grad(set_to_none=True)
        lp, ent = fwd()
        ((lp.reshape(c1.shape) * c1).sum() + (ent.reshape(c2.shape).float() * c2).sum()).backward()
        return lp.detach().reshape(c1.shape), ent.detach().reshape(c2.shape), \
            {n: p.grad.clone() for n, p in model.named_parameters()}

    def unfused():
        logits = model(input_ids=ids, use_cache=False).logits / temperature
        rolled = torch.roll(ids, shifts=-1, dims=-1)
        return verl_F.logprobs_from_logits(logits, rolled), verl_F.entropy_from_logits(logits)

    ref = run(unfused)
    cls = type(model)
    original_forward = cls.forward
    try:
        patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend=backend)
        assert cls.forward is not original_forward

        def fused():
            out = model(input_ids=ids, temperature=temperature, return_dict=True, use_cache=False)
            return out.log_probs, out.entropy

        ours = run(fused)
    finally:
        cls.forward = original_forward
    assert_grad_close(ours[0], ref[0], TOL[torch.float32], what="log_probs")
    assert_grad_close(ours[1], ref[1], TOL[torch.float32], what="entropy")
    assert ref[2].keys() == ours[2].keys()
    for n in ref[2]:
        assert_grad_close(ours[2][n], ref[2][n], TOL[torch.float32], what=f"d {n}")


_ENV_PROBE = r"""
import json, os, sys
import torch
if os.environ.get("PROBE_VIA_VERL"):
    import verl  # noqa: F401  (VERL_USE_EXTERNAL_MODULES imports vespo_ext.integrations.verl from verl/__init__)
from verl.utils.experimental import torch_functional as tf
from verl.utils.kernel import linear_cross_entropy as lce
in_modules = "vespo_ext.integrations.verl" in sys.modules
import vespo_ext.integrations.verl as V
h, w = torch.randn(2, 5, 8), torch.randn(41, 8)
ids = torch.randint(0, 41, (2, 5))
lp, ent = tf.FusedLinearForPPO()(h, w, ids, temperature=0.9)
z = (h @ w.t()) / 0.9
ref = torch.log_softmax(z, -1).gather(-1, ids[..., None])[..., 0]
print(json.dumps({"in_modules": in_modules, "cls": tf.FusedLinearForPPO is V.VespoFusedLinearForPPO,
                  "lce": getattr(lce.linear_cross_entropy, "vespo_original", None) is not None,
                  "err": float((lp - ref).abs().max())}))
"""


def _plugin_registered() -> bool:
    from importlib.metadata import entry_points

    return any(ep.name == "vespo" for ep in entry_points(group="verl.plugins"))


@pytest.mark.parametrize("value, via_verl, patched", [("1", False, True), ("1", True, True), ("0", False, False),
                                                      (None, True, False), ("1", "plugin", True)])
def test_env_var_applies_fused_linear_at_import(value, via_verl, patched):
    """VESPO_VERL_FUSED_LINEAR=1 makes importing vespo_ext.integrations.verl apply use_vespo_fused_linear(), both
    imported directly and (as a Ray worker gets it) by veRL itself, through VERL_USE_EXTERNAL_MODULES or (vespo
    installed: CI's wheel venv) the verl.plugins entry point; "0" or unset leaves veRL's classes alone. A fresh
    interpreter per case (the patch is process-wide)."""
    import json
    import os
    import subprocess
    import sys

    if via_verl == "plugin" and not _plugin_registered():
        pytest.skip("vespo is not installed here (no verl.plugins entry point)")

    env = {k: v for k, v in os.environ.items() if k not in ("VESPO_VERL_FUSED_LINEAR", "VERL_USE_EXTERNAL_MODULES")}
    # An installed vespo registers a "verl.plugins" entry point, which `import verl` loads in every process
    # (the default for wheel users): off except in its own case, so each case sees only the route it names.
    env["VERL_USE_EXTERNAL_PLUGINS"] = "auto" if via_verl == "plugin" else "none"
    if value is not None:
        env["VESPO_VERL_FUSED_LINEAR"] = value
    if via_verl:
        if via_verl is True:
            env["VERL_USE_EXTERNAL_MODULES"] = "vespo_ext.integrations.verl"
        env["PROBE_VIA_VERL"] = "1"
    out = subprocess.run([sys.executable, "-c", _ENV_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["cls"] is patched and res["lce"] is patched, res
    assert res["in_modules"] is bool(via_verl), res  # veRL imported the integration itself
    assert res["err"] < 1e-4, res  # ours when patched, veRL's torch implementation otherwise: the same log-probs
