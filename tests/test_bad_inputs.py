"""Every malformed call raises a Python exception whose message names the offending argument."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import vespo_ext
from vespo_ext import METRIC_NAMES, _core
from vespo_ext import reference as R

from conftest import CUDA_OK, make_packed, make_padded

B, L, V = 2, 3, 5


def padded(device="cpu"):
    kw = make_padded(B, L, V, device=device, holes=False)
    kw["mask"] = torch.ones_like(kw["mask"])  # every position counted
    return kw


def packed(device="cpu"):
    return make_packed([2, 3, 1], V=V, device=device)


def _set(**changes):
    def f(kw):
        kw.update(changes)
        return kw
    return f


def _with(name, fn):
    def f(kw):
        kw[name] = fn(kw)
        return kw
    return f


def _label_at(value, mask_it=False):
    def f(kw):
        kw["labels"] = kw["labels"].clone()
        kw["labels"][1, 1] = value
        if mask_it:
            kw["mask"] = kw["mask"].clone()
            kw["mask"][1, 1] = False
        return kw
    return f


# (id, builder, how to break the padded kwargs, exception, substring of the message)
PADDED_CASES = [
    ("logits-1d", _with("logits", lambda k: k["logits"].reshape(-1)), ValueError, "logits"),
    ("logits-4d", _with("logits", lambda k: k["logits"].unsqueeze(0)), ValueError, "logits"),
    ("logits-int", _with("logits", lambda k: k["logits"].long()), TypeError, "logits"),
    ("logits-bool", _with("logits", lambda k: k["logits"] > 0), TypeError, "logits"),
    ("logits-list", _with("logits", lambda k: k["logits"].tolist()), TypeError, "logits"),
    ("logits-V0", _with("logits", lambda k: k["logits"][..., :0]), ValueError, "logits"),
    ("labels-shape", _with("labels", lambda k: k["labels"][:, :-1]), ValueError, "labels"),
    ("labels-3d", _with("labels", lambda k: k["labels"].unsqueeze(-1)), ValueError, "labels"),
    ("labels-float", _with("labels", lambda k: k["labels"].float()), TypeError, "labels"),
    ("labels-bool", _with("labels", lambda k: k["labels"] > 0), TypeError, "labels"),
    ("labels-none", _set(labels=None), TypeError, "labels"),
    ("labels-too-big", _label_at(V), IndexError, "labels"),
    ("labels-way-too-big", _label_at(V + 10**9), IndexError, "labels"),
    ("labels-negative", _label_at(-1), IndexError, "labels"),
    ("labels-minus-100-counted", _label_at(-100), IndexError, "labels"),
    ("old_logp-shape", _with("old_logp", lambda k: k["old_logp"][:, :-1]), ValueError, "old_logp"),
    ("old_logp-1d", _with("old_logp", lambda k: k["old_logp"].reshape(-1)), ValueError, "old_logp"),
    ("old_logp-int", _with("old_logp", lambda k: k["old_logp"].long()), TypeError, "old_logp"),
    ("old_logp-none", _set(old_logp=None), TypeError, "old_logp"),
    ("advantages-len", _with("advantages", lambda k: torch.zeros(B + 1)), ValueError, "advantages"),
    ("advantages-2d-shape", _with("advantages", lambda k: torch.zeros(B, L + 1)), ValueError, "advantages"),
    ("advantages-3d", _with("advantages", lambda k: torch.zeros(B, L, 1)), ValueError, "advantages"),
    ("advantages-0d", _with("advantages", lambda k: torch.zeros(())), ValueError, "advantages"),
    ("advantages-int", _with("advantages", lambda k: torch.zeros(B, dtype=torch.long)), TypeError, "advantages"),
    ("advantages-float", _set(advantages=1.0), TypeError, "advantages"),
    ("mask-shape", _with("mask", lambda k: k["mask"][:, :-1]), ValueError, "mask"),
    ("mask-1d", _with("mask", lambda k: k["mask"].reshape(-1)), ValueError, "mask"),
    ("mask-list", _with("mask", lambda k: k["mask"].tolist()), TypeError, "mask"),
    ("isw-shape", _set(rollout_is_weights=torch.ones(B, L + 1)), ValueError, "rollout_is_weights"),
    ("isw-int", _set(rollout_is_weights=torch.ones(B, L, dtype=torch.long)), TypeError, "rollout_is_weights"),
    ("temperature-0", _set(temperature=0.0), ValueError, "temperature"),
    ("temperature-neg", _set(temperature=-1.0), ValueError, "temperature"),
    ("temperature-nan", _set(temperature=float("nan")), ValueError, "temperature"),
    ("temperature-inf", _set(temperature=float("inf")), ValueError, "temperature"),
    ("temperature-str", _set(temperature="1.0"), TypeError, "temperature"),
    ("temperature-tensor", _set(temperature=torch.tensor(1.0)), TypeError, "temperature"),
    ("agg-unknown", _set(agg="token-sum"), ValueError, "agg"),
    ("agg-none-typo", _set(agg="Token-Mean"), ValueError, "agg"),
    ("norm-0", _set(norm=0.0), ValueError, "norm"),
    ("norm-neg", _set(norm=-2.0), ValueError, "norm"),
    ("norm-nan", _set(norm=float("nan")), ValueError, "norm"),
    ("norm-str", _set(norm="3"), TypeError, "norm"),
    ("norm-2-elements", _set(norm=torch.tensor([1.0, 2.0])), ValueError, "norm"),
    ("k_pos-nan", _set(k_pos=float("nan")), ValueError, "k_pos"),
    ("lambda_neg-inf", _set(lambda_neg=float("inf")), ValueError, "lambda_neg"),
    ("k_neg-str", _set(k_neg="2"), TypeError, "k_neg"),
    ("grad_inplace-int", _set(grad_inplace=1), TypeError, "grad_inplace"),
    ("cu_seqlens-with-padded", _set(cu_seqlens=torch.tensor([0, 3, 6])), ValueError, "cu_seqlens"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fused", "reference"])
@pytest.mark.parametrize("case", PADDED_CASES, ids=[c[0] for c in PADDED_CASES])
def test_vespo_loss_padded_bad_input(case, dtype):
    _, breaker, exc, needle = case
    kw = padded()
    kw["logits"] = kw["logits"].to(dtype)
    kw = breaker(kw)
    if dtype == torch.float64 and needle == "grad_inplace":
        pytest.skip("the reference takes no grad_inplace")
    with pytest.raises(exc, match=needle):
        vespo_ext.vespo_loss(**kw)
    if dtype == torch.float64:
        kw.pop("grad_inplace", None)
        with pytest.raises(exc, match=needle):
            R.vespo_loss(**kw)


def test_masked_out_of_range_labels_are_fine():
    kw = padded()
    kw["labels"] = kw["labels"].clone()
    kw["labels"][1, 1] = -100
    kw["labels"][0, 2] = V + 7
    kw["mask"][1, 1] = kw["mask"][0, 2] = False
    assert torch.isfinite(vespo_ext.vespo_loss(**kw))


def _cu(values, dtype=torch.int64):
    return lambda k: torch.tensor(values, dtype=dtype)


PACKED_CASES = [  # packed T = 6, S = 3
    ("cu-missing", _set(cu_seqlens=None), ValueError, "cu_seqlens"),
    ("cu-not-from-0", _with("cu_seqlens", _cu([1, 2, 5, 6])), ValueError, "cu_seqlens"),
    ("cu-decreasing", _with("cu_seqlens", _cu([0, 4, 2, 6])), ValueError, "cu_seqlens"),
    ("cu-not-ending-at-T", _with("cu_seqlens", _cu([0, 2, 5, 7])), ValueError, "cu_seqlens"),
    ("cu-short-of-T", _with("cu_seqlens", _cu([0, 2, 5])), ValueError, "cu_seqlens"),
    ("cu-float", _with("cu_seqlens", _cu([0.0, 2.0, 5.0, 6.0], torch.float32)), TypeError, "cu_seqlens"),
    ("cu-int16", _with("cu_seqlens", _cu([0, 2, 5, 6], torch.int16)), TypeError, "cu_seqlens"),
    ("cu-2d", _with("cu_seqlens", lambda k: k["cu_seqlens"].reshape(2, 2)), ValueError, "cu_seqlens"),
    ("cu-empty", _with("cu_seqlens", _cu([])), ValueError, "cu_seqlens"),
    ("cu-list", _set(cu_seqlens=[0, 2, 5, 6]), TypeError, "cu_seqlens"),
    ("advantages-len", _with("advantages", lambda k: torch.zeros(4)), ValueError, "advantages"),
    ("advantages-2d", _with("advantages", lambda k: torch.zeros(3, 2)), ValueError, "advantages"),
    ("old_logp-len", _with("old_logp", lambda k: torch.zeros(5)), ValueError, "old_logp"),
    ("labels-2d", _with("labels", lambda k: k["labels"].reshape(2, 3)), ValueError, "labels"),
    ("mask-len", _with("mask", lambda k: k["mask"][:-1]), ValueError, "mask"),
    ("labels-out-of-range", _with("labels", lambda k: torch.full_like(k["labels"], V)), IndexError, "labels"),
]


@pytest.mark.parametrize("case", PACKED_CASES, ids=[c[0] for c in PACKED_CASES])
def test_vespo_loss_packed_bad_input(case):
    _, breaker, exc, needle = case
    kw = breaker(packed())
    with pytest.raises(exc, match=needle):
        vespo_ext.vespo_loss(**kw)
    with pytest.raises(exc, match=needle):
        R.vespo_loss(**dict(kw, logits=kw["logits"].double()))


def test_unknown_loss():
    with pytest.raises(ValueError, match="loss"):
        vespo_ext.policy_loss(**padded(), loss="ppo2")
    with pytest.raises(ValueError, match="loss"):
        vespo_ext.policy_loss(**padded(), loss=None)


@pytest.mark.parametrize("loss, param", [("grpo", "k_pos"), ("vespo", "clip_ratio_low"), ("vespo", "kpos"),
                                         ("grpo", "lambda_neg")])
def test_parameter_of_another_loss(loss, param):
    with pytest.raises(TypeError, match=param):
        vespo_ext.policy_loss(**padded(), loss=loss, **{param: 1.0})


@pytest.mark.parametrize("loss", ["gspo", "sapo", "cispo"])
def test_baseline_losses_validate_their_parameters(loss):
    """(Formerly: these raised NotImplementedError; they are implemented now -- see test_losses.py.)"""
    with pytest.raises(TypeError, match="k_pos"):
        vespo_ext.policy_loss(**padded(), loss=loss, k_pos=1.0)


# ---------------------------------------------------------------------------------------------
# token_logprobs
TOKEN_CASES = [
    ("logits-1d", lambda: (torch.randn(5), torch.zeros(5, dtype=torch.long), {}), ValueError, "logits"),
    ("logits-int", lambda: (torch.zeros(3, 5, dtype=torch.long), torch.zeros(3, dtype=torch.long), {}),
     TypeError, "logits"),
    ("logits-V0", lambda: (torch.randn(3, 0), torch.zeros(3, dtype=torch.long), {}), ValueError, "logits"),
    ("labels-shape", lambda: (torch.randn(3, 5), torch.zeros(4, dtype=torch.long), {}), ValueError, "labels"),
    ("labels-float", lambda: (torch.randn(3, 5), torch.zeros(3), {}), TypeError, "labels"),
    ("labels-bool", lambda: (torch.randn(3, 5), torch.zeros(3, dtype=torch.bool), {}), TypeError, "labels"),
    ("labels-range", lambda: (torch.randn(3, 5), torch.tensor([0, 5, 1]), {}), IndexError, "labels"),
    ("temperature-0", lambda: (torch.randn(3, 5), torch.zeros(3, dtype=torch.long), {"temperature": 0}),
     ValueError, "temperature"),
    ("temperature-nan", lambda: (torch.randn(3, 5), torch.zeros(3, dtype=torch.long),
                                 {"temperature": float("nan")}), ValueError, "temperature"),
    ("cu-bad", lambda: (torch.randn(3, 5), torch.zeros(3, dtype=torch.long),
                        {"cu_seqlens": torch.tensor([1, 3])}), ValueError, "cu_seqlens"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fused", "reference"])
@pytest.mark.parametrize("case", TOKEN_CASES, ids=[c[0] for c in TOKEN_CASES])
def test_token_logprobs_bad_input(case, dtype):
    _, build, exc, needle = case
    logits, labels, kw = build()
    if logits.dtype.is_floating_point:
        logits = logits.to(dtype)
    with pytest.raises(exc, match=needle):
        vespo_ext.token_logprobs(logits, labels, **kw)


# ---------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and vespo_ext._cuda")
@pytest.mark.parametrize("name", ["labels", "old_logp", "advantages", "mask", "rollout_is_weights"])
def test_mismatched_devices(name):
    kw = packed("cuda")
    kw["rollout_is_weights"] = torch.ones_like(kw["old_logp"])
    kw[name] = kw[name].cpu()
    with pytest.raises(ValueError, match=name):
        vespo_ext.vespo_loss(**kw)
    kw = padded("cuda")
    with pytest.raises(ValueError, match="norm"):
        vespo_ext.vespo_loss(**kw, norm=torch.tensor([2.0]))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and vespo_ext._cuda")
def test_host_cu_seqlens_accepted():
    """cu_seqlens is validated on the host anyway; a CPU copy with CUDA logits is accepted."""
    kw = packed("cuda")
    a = vespo_ext.vespo_loss(**kw)
    b = vespo_ext.vespo_loss(**dict(kw, cu_seqlens=kw["cu_seqlens"].cpu()))
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# The raw binding never crashes: wrong shapes/dtypes/objects raise ValueError/TypeError.
def _fwd_args(T=4, V=6):
    return dict(logits=torch.randn(T, V), labels=torch.randint(0, V, (T,)), mask=None, logp=torch.empty(T),
                lse=torch.empty(T), entropy=None, bad_label_row=torch.zeros(1, dtype=torch.long))


def _seq_args(T=4, S=2):
    core = _core
    return dict(cu_seqlens=torch.tensor([0, 1, T]), logp=-torch.rand(T), old_logp=-torch.rand(T),
                advantages=torch.randn(S), mask=None, rollout_is_weights=None, norm=None, loss=torch.empty(1),
                dlogp=torch.empty(T), metrics=torch.empty(core.num_metrics),
                workspace=torch.empty((S + 1) * core.seq_stride, dtype=torch.float64))


def _bwd_args(T=4, V=6):
    return dict(logits=torch.randn(T, V), labels=torch.randint(0, V, (T,)), mask=None, logp=-torch.rand(T),
                lse=torch.rand(T), dlogp=torch.randn(T), grad_scale=torch.ones(1), grad=torch.empty(T, V))


class NotDLPack:
    pass


class JunkDLPack:
    def __dlpack__(self, stream=None):
        return "not a capsule"

    def __dlpack_device__(self):
        return (1, 0)


RAW_FWD = [
    ("logits", torch.randn(2, 4, 6), ValueError), ("logits", torch.randn(4, 6).double(), ValueError),
    ("logits", torch.randint(0, 3, (4, 6)), ValueError), ("logits", torch.randn(4, 0), ValueError),
    ("logits", torch.randn(6, 4).t(), ValueError), ("logits", NotDLPack(), TypeError),
    ("logits", [[0.0] * 6] * 4, TypeError), ("logits", JunkDLPack(), (ValueError, TypeError)),
    ("labels", torch.randint(0, 6, (4,)).int(), ValueError), ("labels", torch.zeros(3, dtype=torch.long), ValueError),
    ("labels", torch.zeros(4, 1, dtype=torch.long), ValueError),
    ("mask", torch.ones(4), ValueError), ("mask", torch.ones(5, dtype=torch.bool), ValueError),
    ("logp", torch.empty(3), ValueError), ("logp", torch.empty(4).double(), ValueError),
    ("logp", torch.empty(8)[::2], ValueError), ("lse", torch.empty(4, 1), ValueError),
    ("entropy", torch.empty(2), ValueError), ("bad_label_row", torch.zeros(1), ValueError),
    ("bad_label_row", torch.zeros(2, dtype=torch.long), ValueError),
]


@pytest.mark.parametrize("arg, value, exc", RAW_FWD, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(RAW_FWD)])
def test_raw_logprob_fwd(arg, value, exc):
    kw = _fwd_args()
    kw[arg] = value
    with pytest.raises(exc, match=arg if exc is ValueError else None):
        _core.logprob_fwd(**kw, inv_temperature=1.0)


@pytest.mark.parametrize("inv_t", [0.0, -1.0, float("nan")])
def test_raw_logprob_fwd_temperature(inv_t):
    with pytest.raises(ValueError, match="temperature"):
        _core.logprob_fwd(**_fwd_args(), inv_temperature=inv_t)


def test_raw_logprob_fwd_ok_and_missing_kwargs():
    kw = _fwd_args()
    _core.logprob_fwd(**kw, inv_temperature=1.0)
    torch.testing.assert_close(kw["logp"], torch.log_softmax(kw["logits"], -1).gather(
        -1, kw["labels"].unsqueeze(-1)).squeeze(-1))
    with pytest.raises(TypeError):
        _core.logprob_fwd(**kw)  # inv_temperature is required
    with pytest.raises(TypeError):
        _core.logprob_fwd(**kw, inv_temperature="1")


RAW_SEQ = [
    ("cu_seqlens", torch.tensor([0, 1, 4], dtype=torch.int32), ValueError),
    ("cu_seqlens", torch.tensor([0, 1, 5]), ValueError), ("cu_seqlens", torch.tensor([1, 1, 4]), ValueError),
    ("cu_seqlens", torch.tensor([0, 3, 2, 4]), ValueError), ("cu_seqlens", torch.zeros(0, dtype=torch.long), ValueError),
    ("cu_seqlens", torch.tensor([[0, 4]]), ValueError), ("cu_seqlens", NotDLPack(), TypeError),
    ("logp", torch.zeros(4, 1), ValueError), ("logp", torch.zeros(4).double(), ValueError),
    ("old_logp", torch.zeros(3), ValueError),
    ("advantages", torch.zeros(3), ValueError), ("advantages", torch.zeros(2).half(), ValueError),
    ("mask", torch.zeros(4, dtype=torch.int32), ValueError), ("rollout_is_weights", torch.ones(5), ValueError),
    ("norm", torch.ones(2), ValueError), ("norm", torch.ones(1).double(), ValueError),
    ("loss", torch.empty(2), ValueError), ("dlogp", torch.empty(3), ValueError),
    ("metrics", torch.empty(3), ValueError),
    ("workspace", torch.empty(5, dtype=torch.float64), ValueError), ("workspace", torch.empty(36), ValueError),
]


@pytest.mark.parametrize("arg, value, exc", RAW_SEQ, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(RAW_SEQ)])
def test_raw_seq_reduce(arg, value, exc):
    kw = _seq_args()
    kw[arg] = value
    with pytest.raises(exc):
        _core.seq_reduce(**kw, loss_type=0, params=[2.0, 3.0, 3.0, 2.0], agg=0, norm_len=0.0)


@pytest.mark.parametrize("opts", [dict(loss_type=-1), dict(loss_type=99), dict(agg=7), dict(agg=-1),
                                  dict(params=[1.0] * 7), dict(params="abc"), dict(norm_len="x")])
def test_raw_seq_reduce_options(opts):
    base = dict(loss_type=0, params=[2.0, 3.0, 3.0, 2.0], agg=0, norm_len=0.0)
    with pytest.raises((ValueError, TypeError)):
        _core.seq_reduce(**_seq_args(), **{**base, **opts})


def test_raw_seq_reduce_ok():
    kw = _seq_args()
    _core.seq_reduce(**kw, loss_type=0, params=[2.0, 3.0, 3.0, 2.0], agg=0, norm_len=0.0)
    ref, metrics = R.policy_loss_from_logp(kw["logp"].double(), kw["old_logp"].double(), kw["advantages"].double(),
                                          cu_seqlens=kw["cu_seqlens"], return_metrics=True)
    assert float(kw["loss"]) == pytest.approx(float(ref), rel=1e-5, abs=1e-7)
    assert float(kw["metrics"][METRIC_NAMES.index("n_tokens")]) == 4


RAW_BWD = [
    ("grad", torch.empty(4, 5), ValueError), ("grad", torch.empty(4, 6).half(), ValueError),
    ("grad", torch.empty(6, 4).t(), ValueError), ("grad", NotDLPack(), TypeError),
    ("grad_scale", torch.ones(2), ValueError), ("grad_scale", torch.ones(1).double(), ValueError),
    ("dlogp", torch.zeros(3), ValueError), ("lse", torch.zeros(4).half(), ValueError),
    ("logits", torch.randn(4, 6).half(), ValueError),  # grad must then have the logits' dtype
]


@pytest.mark.parametrize("arg, value, exc", RAW_BWD, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(RAW_BWD)])
def test_raw_logprob_bwd(arg, value, exc):
    kw = _bwd_args()
    kw[arg] = value
    with pytest.raises(exc):
        _core.logprob_bwd(**kw, inv_temperature=1.0)


def test_raw_binding_rejects_grad_requiring_tensor():
    kw = _fwd_args()
    kw["logits"].requires_grad_(True)
    with pytest.raises((RuntimeError, TypeError, ValueError, BufferError)):
        _core.logprob_fwd(**kw, inv_temperature=1.0)


# A required array passed as None must raise, not dereference a null DLPack tensor. Run in a
# subprocess (NumPy arrays, no torch import: fast) so that a segfault fails one test, not the run.
_NONE_SCRIPT = r"""
import sys
import numpy as np
from vespo_ext import _core
T, V, S = 4, 6, 2
f32 = lambda *s: np.zeros(s, np.float32)
fwd = dict(logits=np.random.randn(T, V).astype(np.float32), labels=np.zeros(T, np.int64), mask=None,
           logp=f32(T), lse=f32(T), entropy=None, bad_label_row=np.zeros(1, np.int64))
seq = dict(cu_seqlens=np.array([0, 1, T], np.int64), logp=-np.ones(T, np.float32), old_logp=f32(T),
           advantages=f32(S), mask=None, rollout_is_weights=None, norm=None, loss=f32(1), dlogp=f32(T),
           metrics=f32(_core.num_metrics), workspace=np.zeros((S + 1) * _core.seq_stride))
bwd = dict(logits=np.random.randn(T, V).astype(np.float32), labels=np.zeros(T, np.int64), mask=None,
           logp=-np.ones(T, np.float32), lse=f32(T), dlogp=f32(T), grad_scale=None, grad=f32(T, V))
fn, arg = sys.argv[1], sys.argv[2]
kw, f = {"fwd": (fwd, _core.logprob_fwd), "seq": (seq, _core.seq_reduce), "bwd": (bwd, _core.logprob_bwd)}[fn]
extra = dict(loss_type=0, params=[2.0, 3.0, 3.0, 2.0], agg=0, norm_len=0.0) if fn == "seq" else dict(inv_temperature=1.0)
f(**kw, **extra)  # the unbroken call works
kw[arg] = None
try:
    f(**kw, **extra)
except (ValueError, TypeError) as e:
    print("RAISED", type(e).__name__, e)
else:
    print("NO ERROR")
"""
REQUIRED = [("fwd", a) for a in ("logits", "labels", "logp", "lse", "bad_label_row")] + \
    [("seq", a) for a in ("cu_seqlens", "logp", "old_logp", "advantages", "loss", "dlogp", "metrics", "workspace")] + \
    [("bwd", a) for a in ("logits", "labels", "logp", "lse", "dlogp", "grad")]


@pytest.mark.parametrize("fn, arg", REQUIRED, ids=[f"{f}-{a}" for f, a in REQUIRED])
def test_raw_binding_required_none_raises(fn, arg):
    r = subprocess.run([sys.executable, "-c", _NONE_SCRIPT, fn, arg], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"crashed with return code {r.returncode}: {r.stderr[-500:]}"
    assert "RAISED" in r.stdout and arg in r.stdout, r.stdout + r.stderr
