"""Regression tests for the fuzzing findings of issue #18 (part 4)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import vespo_ext
from vespo_ext import dlpack_api
from vespo_ext import reference as R

from conftest import make_packed


def test_backward_is_shift_invariant(device):
    """Adding a constant to every logit changes nothing: the backward forms exp((z - max)/tau - log s)."""
    inp = make_packed([40, 24], V=4096, device=device)
    grads = []
    for off in (0.0, 1e4, 3e4):
        x = (inp["logits"] + off).requires_grad_(True)
        args = {k: v for k, v in inp.items() if k != "logits"}
        vespo_ext.vespo_loss(x, **args, temperature=0.8).backward()
        grads.append(x.grad.double())
    d = {k: (v.double() if v.dtype.is_floating_point else v) for k, v in inp.items()}
    z = d.pop("logits").requires_grad_(True)
    R.vespo_loss(z, **d, temperature=0.8).backward()
    gmax = float(z.grad.abs().max())
    for off, g in zip((0.0, 1e4, 3e4), grads):
        err = float((g - z.grad).abs().max())
        # at offset 3e4 the fp32 logits themselves carry 2e-3 of rounding: compare with what they hold
        assert err <= 2e-4 * gmax or off > 0, (off, err / gmax)
    # the gradient of the shifted (fp32-rounded) logits vs float64 on the same fp32 values
    for off in (1e4, 3e4):
        xs = inp["logits"] + off
        x = xs.clone().requires_grad_(True)
        args = {k: v for k, v in inp.items() if k != "logits"}
        vespo_ext.vespo_loss(x, **args, temperature=0.8).backward()
        zs = xs.double().requires_grad_(True)
        R.vespo_loss(zs, **d, temperature=0.8).backward()
        err = float((x.grad.double() - zs.grad).abs().max())
        assert err <= 2e-4 * float(zs.grad.abs().max()), (off, err)


def test_gspo_nan_at_counted_token_is_not_hidden(device):
    inp = make_packed([5, 6], V=11, device=device)
    inp["old_logp"][2] = float("nan")
    inp["mask"][2] = True
    inp["advantages"][0] = 1.0
    loss = vespo_ext.policy_loss(**inp, loss="gspo")
    ref = R.policy_loss(**inp, loss="gspo")
    assert math.isnan(float(ref))
    assert math.isnan(float(loss)), float(loss)


@pytest.mark.parametrize("norm", [0.0, -2.0, float("nan"), 1e-50, float("inf")])
def test_bad_norm_tensor_is_refused(device, norm):
    inp = make_packed([5, 6], V=11, device=device)
    with pytest.raises(ValueError, match="norm"):
        vespo_ext.vespo_loss(**inp, norm=torch.tensor(norm, device=device))
    with pytest.raises(ValueError, match="norm"):
        vespo_ext.vespo_loss(**inp, norm=norm)


def _np_batch(T=6, V=9, S=2):
    rng = np.random.default_rng(0)
    cu = np.linspace(0, T, S + 1).astype(np.int64)
    return dict(logits=rng.standard_normal((T, V)).astype(np.float32), labels=rng.integers(0, V, T).astype(np.int64),
                old_logp=np.full(T, -2.0, np.float32), advantages=np.ones(S, np.float32), cu_seqlens=cu)


@pytest.mark.parametrize("norm", [0.0, -2.0, float("nan"), 1e-50])
def test_dlpack_forward_validates_norm(norm):
    with pytest.raises(ValueError, match="norm"):
        dlpack_api.forward(**_np_batch(), norm=norm)


def test_tiny_temperature_is_refused():
    inp = make_packed([5, 6], V=11)
    with pytest.raises(ValueError, match="temperature"):
        vespo_ext.vespo_loss(**inp, temperature=1e-39)
    with pytest.raises(ValueError, match="temperature"):
        vespo_ext.token_logprobs(inp["logits"], inp["labels"], temperature=1e-39)
    with pytest.raises(ValueError, match="temperature"):
        dlpack_api.forward(**_np_batch(), temperature=1e-39)


def test_float_ignore_index_is_refused():
    z, y = torch.randn(4, 7), torch.tensor([0, 3, -100, 6])
    with pytest.raises(TypeError, match="ignore_index"):
        vespo_ext.token_logprobs(z, y, ignore_index=3.5)
    with pytest.raises(TypeError, match="ignore_index"):
        R.token_logprobs(z, y, ignore_index=3.5)


def test_expanded_logits_are_accepted(device):
    row = torch.randn(1, 13, device=device)
    z = row.expand(8, 13)  # row stride 0
    y = torch.randint(0, 13, (8,), device=device)
    got = vespo_ext.token_logprobs(z, y)
    assert torch.allclose(got, R.token_logprobs(z.contiguous(), y), atol=1e-6)
    inp = make_packed([3, 5], V=13, device=device)
    inp["logits"] = row.expand(8, 13)
    lf = vespo_ext.vespo_loss(**inp)
    lr = R.vespo_loss(**{k: (v.double() if v.dtype.is_floating_point else v) for k, v in inp.items()})
    assert abs(float(lf) - float(lr)) <= 1e-5 * max(1.0, abs(float(lr)))


def test_dlpack_expanded_message_says_what_to_do():
    b = _np_batch()
    b["logits"] = np.broadcast_to(b["logits"][:1], b["logits"].shape)
    with pytest.raises(ValueError, match="contiguous"):
        dlpack_api.forward(**b)


def test_dlpack_empty_numpy_batch():
    b = _np_batch()
    b = dict(logits=np.zeros((0, 9), np.float32), labels=np.zeros(0, np.int64), old_logp=np.zeros(0, np.float32),
             advantages=np.zeros(0, np.float32), cu_seqlens=np.zeros(1, np.int64))
    out = dlpack_api.forward(**b)
    assert float(out["loss"][0]) == 0.0
    g = dlpack_api.backward(b["logits"], b["labels"], out)
    assert g.shape == (0, 9)


def test_dlpack_python_list_names_the_argument():
    b = _np_batch()
    b["old_logp"] = b["old_logp"].tolist()
    with pytest.raises(TypeError, match="old_logp"):
        dlpack_api.forward(**b)


def test_dlpack_int32_cu_seqlens():
    b = _np_batch()
    want = dlpack_api.forward(**b)
    b["cu_seqlens"] = b["cu_seqlens"].astype(np.int32)
    got = dlpack_api.forward(**b)
    assert float(got["loss"][0]) == float(want["loss"][0])


def test_dlpack_backward_is_shift_invariant():
    b = _np_batch(T=8, V=300)
    b32 = dict(b)
    b32["logits"] = (b["logits"] + np.float32(2e4)).astype(np.float32)
    f = dlpack_api.forward(**b32)
    g = dlpack_api.backward(b32["logits"], b32["labels"], f)
    z = torch.from_numpy(b32["logits"]).double().requires_grad_(True)
    R.vespo_loss(z, torch.from_numpy(b["labels"]), torch.from_numpy(b["old_logp"]), torch.from_numpy(b["advantages"]),
                 cu_seqlens=torch.from_numpy(b["cu_seqlens"])).backward()
    err = np.abs(g.astype(np.float64) - z.grad.numpy()).max()
    assert err <= 2e-4 * np.abs(z.grad.numpy()).max(), err


def test_advantages_layout_is_never_guessed_when_S_equals_T(device):
    """Packed with empty sequences: S == T, so a (T,) vector could be either layout."""
    lengths = [3, 0, 0, 1, 2, 0]  # S = 6 = T
    inp = make_packed(lengths, V=11, device=device)
    inp["advantages"] = torch.linspace(-1, 1, 6, device=device)
    with pytest.raises(ValueError, match="advantages_per"):
        vespo_ext.vespo_loss(**inp)
    with pytest.raises(ValueError, match="advantages_per"):
        R.vespo_loss(**inp)
    d = {k: (v.double() if v.dtype.is_floating_point else v) for k, v in inp.items()}
    for per in ("sequence", "token"):
        lf = vespo_ext.vespo_loss(**inp, advantages_per=per)
        lr = R.vespo_loss(**d, advantages_per=per)
        assert abs(float(lf) - float(lr)) <= 1e-5 * max(1.0, abs(float(lr))), (per, float(lf), float(lr))
    # per token = the same values laid out per token by hand, with an unambiguous S
    seq = torch.repeat_interleave(torch.arange(6), torch.tensor(lengths)).to(device)
    tok = inp["advantages"][seq]
    a = vespo_ext.vespo_loss(**{**inp, "advantages": tok}, advantages_per="token")
    b = vespo_ext.vespo_loss(**{**inp, "advantages": inp["advantages"]}, advantages_per="sequence")
    assert float(a) == pytest.approx(float(b), rel=1e-6)
    lp = vespo_ext.token_logprobs(inp["logits"], inp["labels"])
    with pytest.raises(ValueError, match="advantages_per"):
        vespo_ext.policy_loss_from_logp(lp, inp["old_logp"], inp["advantages"], inp["mask"],
                                        cu_seqlens=inp["cu_seqlens"])


def test_cuda_bad_label_is_reported_without_a_sync(device, monkeypatch):
    """On CUDA the bad-label flag is not read in the forward; the error comes at the next op call or
    at check_errors(). On CPU it is immediate."""
    from vespo_ext import ops

    monkeypatch.setattr(ops, "_SYNC_CHECKS", False)
    z = torch.randn(5, 7, device=device)
    y = torch.tensor([0, 1, 9, 2, 3], device=device)
    if device.type == "cpu":
        with pytest.raises(IndexError, match=r"labels\[2\]"):
            vespo_ext.token_logprobs(z, y)
        return
    vespo_ext.token_logprobs(z, y)  # returns; nothing read on the host
    with pytest.raises(IndexError, match=r"labels\[2\]"):
        vespo_ext.check_errors()
    vespo_ext.check_errors()  # reported once
    vespo_ext.token_logprobs(z, y)
    torch.cuda.synchronize()
    with pytest.raises(IndexError, match=r"labels\[2\]"):
        vespo_ext.token_logprobs(z, torch.zeros_like(y))  # the next call raises the earlier error
