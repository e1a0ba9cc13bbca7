"""The raw DLPack binding (vespo_ext._core) and vespo_ext.dlpack_api with NumPy (and CuPy) arrays."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import vespo_ext
from vespo_ext import AGGS, LOSSES, METRIC_NAMES, _core
from vespo_ext import reference as R
from vespo_ext._spec import AGG_IDS, LOSS_IDS, LOSS_PARAMS

from conftest import CUDA_OK, assert_grad_close, assert_metrics_close

NO_IGNORE = -(2**63)


def test_constants():
    assert _core.num_metrics == len(METRIC_NAMES)
    assert _core.seq_stride == vespo_ext.ops._SEQ_STRIDE
    assert _core.backend == "cpu"


def np_batch(lengths, V, dtype=np.float32, seed=0, mask_p=0.85, tis=True):
    rng = np.random.default_rng(seed)
    T, S = int(sum(lengths)), len(lengths)
    logits = (rng.standard_normal((T, V)) * 2).astype(dtype)
    labels = rng.integers(0, V, T).astype(np.int64)
    mask = rng.random(T) < mask_p
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    x = torch.from_numpy(logits.astype(np.float64))
    lp = (torch.log_softmax(x, -1).gather(-1, torch.from_numpy(labels).unsqueeze(-1)).squeeze(-1)).numpy()
    old = (lp + 0.3 * rng.standard_normal(T) / np.sqrt(max(T / max(S, 1), 1))).astype(np.float32)
    adv = rng.standard_normal(S).astype(np.float32)
    isw = np.exp(0.2 * rng.standard_normal(T)).astype(np.float32) if tis else None
    return dict(logits=logits, labels=labels, mask=mask, cu=cu, old=old, adv=adv, isw=isw)


def ref_logsoftmax(logits, labels, inv_t=1.0):
    x = torch.from_numpy(np.asarray(logits, dtype=np.float64)) * inv_t
    lsm = torch.log_softmax(x, -1)
    lab = torch.from_numpy(labels).clamp(0, x.shape[-1] - 1)
    return lsm.gather(-1, lab.unsqueeze(-1)).squeeze(-1), -(lsm.exp() * lsm).sum(-1), lsm


def fwd(b, inv_t=1.0, entropy=False, mask=True, ignore_index=NO_IGNORE, logits=None):
    logits = b["logits"] if logits is None else logits
    T = logits.shape[0]
    out = dict(logp=np.full(T, np.nan, np.float32), lse=np.full(T, np.nan, np.float32),
               entropy=np.full(T, np.nan, np.float32) if entropy else None, bad=np.zeros(1, np.int64))
    _core.logprob_fwd(logits, b["labels"], b["mask"] if mask is True else mask, out["logp"], out["lse"],
                      out["entropy"], out["bad"], inv_temperature=inv_t, ignore_index=ignore_index)
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("mask_kind", ["bool", "uint8", "none"])
@pytest.mark.parametrize("V", [1, 7, 300, 4099])
@pytest.mark.parametrize("inv_t", [1.0, 1 / 0.7])
def test_logprob_fwd(dtype, mask_kind, V, inv_t):
    b = np_batch([5, 3, 8], V, dtype=dtype)
    mask = {"bool": b["mask"], "uint8": b["mask"].astype(np.uint8), "none": None}[mask_kind]
    out = fwd(b, inv_t, entropy=True, mask=mask)
    lp, ent, _ = ref_logsoftmax(b["logits"], b["labels"], inv_t)
    on = np.ones(len(lp), bool) if mask is None else b["mask"]
    scale = 1 + np.abs(b["logits"].astype(np.float64)).max(-1) * inv_t
    assert np.all(np.abs(out["logp"][on] - lp.numpy()[on]) <= 2e-6 * scale[on])
    assert np.all(np.abs(out["entropy"][on] - ent.numpy()[on]) <= 2e-6 * scale[on])
    assert np.all(out["logp"][~on] == 0) and np.all(out["lse"][~on] == 0) and np.all(out["entropy"][~on] == 0)
    assert out["bad"][0] == 0


def test_logprob_fwd_strided_rows():
    b = np_batch([4, 6], 33)
    big = np.zeros((10, 50), np.float32)
    big[:, 5:38] = b["logits"]
    a, c = fwd(b, entropy=True), fwd(b, entropy=True, logits=big[:, 5:38])
    assert np.array_equal(a["logp"], c["logp"]) and np.array_equal(a["entropy"], c["entropy"])


def test_logprob_fwd_bad_label_row_and_ignore_index():
    b = np_batch([6, 4], 9, mask_p=1.0)
    b["labels"][3], b["labels"][7] = 9, -100
    out = fwd(b)
    assert out["bad"][0] == 4  # 1-based, smallest bad row
    out = fwd(b, ignore_index=-100)
    assert out["bad"][0] == 4 and out["logp"][7] == 0
    b["labels"][3] = 2
    out = fwd(b, ignore_index=-100)
    assert out["bad"][0] == 0 and out["logp"][7] == 0
    b["mask"][3], b["labels"][3] = False, 10**6  # masked rows are never checked
    assert fwd(b, ignore_index=-100)["bad"][0] == 0


def seq(b, logp, loss="vespo", agg="token-mean", norm=None, mask=True, adv=None, **params):
    T, S = logp.shape[0], b["cu"].shape[0] - 1
    o = dict(loss=np.full(1, np.nan, np.float32), dlogp=np.full(T, np.nan, np.float32),
             metrics=np.full(_core.num_metrics, np.nan, np.float32))
    ws = np.full((S + 1) * _core.seq_stride, np.nan)  # contents on entry must not matter
    vals = [float(params.get(k, v)) for k, v in LOSS_PARAMS[loss].items()]
    nrm = None if norm is None else np.array([norm], np.float32)
    _core.seq_reduce(b["cu"], logp, b["old"], b["adv"] if adv is None else adv, b["mask"] if mask is True else mask,
                     b["isw"], nrm, o["loss"], o["dlogp"], o["metrics"], ws, loss_type=LOSS_IDS[loss], params=vals,
                     agg=AGG_IDS[agg], norm_len=0.0)
    return o


def ref_seq(b, logp, loss="vespo", agg="token-mean", norm=None, adv=None, **params):
    t = lambda a: None if a is None else torch.from_numpy(np.asarray(a)).double()  # noqa: E731
    lp = t(logp).requires_grad_(True)
    out, m = R.policy_loss_from_logp(lp, t(b["old"]), t(b["adv"] if adv is None else adv), torch.from_numpy(b["mask"]),
                                     loss=loss, cu_seqlens=torch.from_numpy(b["cu"]), rollout_is_weights=t(b["isw"]),
                                     agg=agg, norm=None if norm is None else torch.tensor(float(norm)),
                                     return_metrics=True, **params)
    out.backward()
    return float(out.detach()), lp.grad.numpy(), m


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("norm", [None, 2.5])
def test_seq_reduce(loss, agg, norm):
    b = np_batch([5, 1, 0, 7, 3], 11, seed=3)
    logp = fwd(b)["logp"]
    o = seq(b, logp, loss, agg, norm)
    r_loss, r_dlogp, r_m = ref_seq(b, logp, loss, agg, norm)
    assert float(o["loss"][0]) == pytest.approx(r_loss, rel=1e-5, abs=1e-7)
    assert_grad_close(torch.from_numpy(o["dlogp"]), torch.from_numpy(r_dlogp), 1e-5, what="dlogp")
    assert_metrics_close({k: torch.tensor(o["metrics"][i]) for i, k in enumerate(METRIC_NAMES)}, r_m)


def test_seq_reduce_per_token_advantages_and_no_mask():
    b = np_batch([4, 6, 2], 9, seed=5)
    logp = fwd(b, mask=None)["logp"]
    adv_t = np.repeat(b["adv"], [4, 6, 2]).astype(np.float32)
    adv_t[5] = -adv_t[5]
    o = seq(b, logp, "vespo", "seq-mean-token-sum", adv=adv_t, mask=None)
    b_all = dict(b, mask=np.ones_like(b["mask"]))
    r_loss, r_dlogp, _ = ref_seq(b_all, logp, "vespo", "seq-mean-token-sum", adv=adv_t)
    assert float(o["loss"][0]) == pytest.approx(r_loss, rel=1e-5)
    assert_grad_close(torch.from_numpy(o["dlogp"]), torch.from_numpy(r_dlogp), 1e-5, what="dlogp")


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("inplace", [False, True])
def test_logprob_bwd(dtype, inplace):
    b = np_batch([6, 5], 67, dtype=dtype)
    inv_t = 1 / 1.3
    f = fwd(b, inv_t)
    dlogp = np.random.default_rng(1).standard_normal(11).astype(np.float32)
    scale = np.array([0.75], np.float32)
    logits = b["logits"].copy()
    grad = logits if inplace else np.full_like(logits, np.nan)
    _core.logprob_bwd(logits, b["labels"], b["mask"], f["logp"], f["lse"], dlogp, scale, grad, inv_temperature=inv_t)
    _, _, lsm = ref_logsoftmax(b["logits"], b["labels"], inv_t)
    onehot = torch.nn.functional.one_hot(torch.from_numpy(b["labels"]), 67).double()
    c = torch.from_numpy(dlogp * b["mask"] * 0.75).double().unsqueeze(-1)
    want = c * (onehot - lsm.exp()) * inv_t
    assert_grad_close(torch.from_numpy(grad.astype(np.float64)), want, 2e-4 if dtype == np.float32 else 1e-2)
    assert np.all(grad[~b["mask"]] == 0)


def test_full_pipeline_matches_torch_reference():
    b = np_batch([7, 2, 9], 40, seed=7)
    f = fwd(b, 1 / 0.8)
    o = seq(b, f["logp"], "vespo", "seq-mean-token-mean")
    grad = np.empty_like(b["logits"])
    _core.logprob_bwd(b["logits"], b["labels"], b["mask"], f["logp"], f["lse"], o["dlogp"], None, grad,
                      inv_temperature=1 / 0.8)
    z = torch.from_numpy(b["logits"]).double().requires_grad_(True)
    t = lambda a: torch.from_numpy(a).double()  # noqa: E731
    ref = R.vespo_loss(z, torch.from_numpy(b["labels"]), t(b["old"]), t(b["adv"]), torch.from_numpy(b["mask"]),
                       cu_seqlens=torch.from_numpy(b["cu"]), rollout_is_weights=t(b["isw"]), temperature=0.8,
                       agg="seq-mean-token-mean")
    ref.backward()
    assert float(o["loss"][0]) == pytest.approx(float(ref.detach()), rel=2e-4)
    assert_grad_close(torch.from_numpy(grad), z.grad, 2e-4)


def test_bad_numpy_arguments():
    b = np_batch([3, 2], 6)
    with pytest.raises(ValueError, match="labels"):
        fwd(dict(b, labels=b["labels"].astype(np.int32)))
    with pytest.raises(ValueError, match="logits"):
        fwd(b, logits=b["logits"].astype(np.float64))
    with pytest.raises(ValueError, match="logits"):
        fwd(b, logits=np.asfortranarray(b["logits"]))
    with pytest.raises(ValueError, match="mask"):
        fwd(b, mask=b["mask"].astype(np.int32))
    with pytest.raises(ValueError, match="workspace"):
        _core.seq_reduce(b["cu"], np.zeros(5, np.float32), b["old"], b["adv"], None, None, None,
                         np.zeros(1, np.float32), np.zeros(5, np.float32), np.zeros(_core.num_metrics, np.float32),
                         np.zeros(4), loss_type=0, params=[2.0, 3.0, 3.0, 2.0], agg=0, norm_len=0.0)


# ---------------------------------------------------------------------------------------------
# vespo_ext.dlpack_api (framework-free forward/backward), if present
def _dlpack_api():
    return pytest.importorskip("vespo_ext.dlpack_api")


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("agg", [None, "seq-mean-token-sum"])
@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_dlpack_api_matches_reference(loss, agg, lib):
    api = _dlpack_api()
    b = np_batch([5, 2, 0, 6], 23, seed=11)
    conv = (lambda a: a) if lib == "numpy" else (lambda a: None if a is None else torch.from_numpy(a))
    args = [conv(b[k]) for k in ("logits", "labels", "old", "adv", "cu")]
    f = api.forward(*args, mask=conv(b["mask"]), rollout_is_weights=conv(b["isw"]), temperature=1.1, loss=loss,
                    agg=agg)
    grad = api.backward(args[0], args[1], f, mask=conv(b["mask"]))
    assert type(grad) is type(args[0]) and tuple(grad.shape) == b["logits"].shape
    z = torch.from_numpy(b["logits"]).double().requires_grad_(True)
    t = lambda a: torch.from_numpy(a).double()  # noqa: E731
    ref, rm = R.policy_loss(z, torch.from_numpy(b["labels"]), t(b["old"]), t(b["adv"]), torch.from_numpy(b["mask"]),
                            loss=loss, cu_seqlens=torch.from_numpy(b["cu"]), rollout_is_weights=t(b["isw"]),
                            temperature=1.1, agg=agg, return_metrics=True)
    ref.backward()
    assert float(f["loss"][0]) == pytest.approx(float(ref.detach()), rel=2e-4, abs=1e-7)
    assert_grad_close(torch.as_tensor(np.asarray(grad)), z.grad, 2e-4)
    assert_metrics_close({k: torch.tensor(float(v)) for k, v in f["metrics"].items()}, rm)


def test_dlpack_api_errors_and_inplace():
    api = _dlpack_api()
    b = np_batch([4, 4], 9, seed=2, mask_p=1.0)
    args = [b[k] for k in ("logits", "labels", "old", "adv", "cu")]
    f = api.forward(*args, mask=b["mask"])
    g = api.backward(b["logits"], b["labels"], f, mask=b["mask"])
    logits = b["logits"].copy()
    g2 = api.backward(logits, b["labels"], f, mask=b["mask"], out=logits)
    assert g2 is logits and np.array_equal(g, logits)
    bad = b["labels"].copy()
    bad[5] = 9
    with pytest.raises(IndexError, match="labels"):
        api.forward(args[0], bad, *args[2:], mask=b["mask"])
    with pytest.raises(ValueError, match="temperature"):
        api.forward(*args, temperature=0.0)
    with pytest.raises(ValueError, match="loss"):
        api.forward(*args, loss="nope")


def test_dlpack_api_rejects_non_arrays():
    """A non-array argument gets the module's own TypeError ('pass NumPy, CuPy or torch arrays')."""
    api = _dlpack_api()
    b = np_batch([4, 4], 9, seed=2, mask_p=1.0)
    args = [b[k] for k in ("labels", "old", "adv", "cu")]
    with pytest.raises(TypeError):
        api.forward(b["logits"].tolist(), *args)


# ---------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and vespo_ext._cuda")
def test_cupy_raw_binding_and_dlpack_api():
    cp = pytest.importorskip("cupy")
    from vespo_ext import _cuda

    b = np_batch([6, 3, 5], 129, seed=4)
    d = {k: (None if v is None else cp.asarray(v)) for k, v in b.items()}
    T = b["logits"].shape[0]
    logp, lse, bad = cp.empty(T, cp.float32), cp.empty(T, cp.float32), cp.zeros(1, cp.int64)
    stream = cp.cuda.get_current_stream().ptr
    _cuda.logprob_fwd(d["logits"], d["labels"], d["mask"], logp, lse, None, bad, inv_temperature=1.0,
                      ignore_index=NO_IGNORE, stream=stream)
    cp.cuda.get_current_stream().synchronize()
    cpu = fwd(b)
    np.testing.assert_allclose(cp.asnumpy(logp), cpu["logp"], rtol=1e-5, atol=1e-5)
    api = _dlpack_api()
    f = api.forward(d["logits"], d["labels"], d["old"], d["adv"], d["cu"], mask=d["mask"],
                    rollout_is_weights=d["isw"])
    grad = api.backward(d["logits"], d["labels"], f, mask=d["mask"])
    fc = api.forward(b["logits"], b["labels"], b["old"], b["adv"], b["cu"], mask=b["mask"], rollout_is_weights=b["isw"])
    gc = api.backward(b["logits"], b["labels"], fc, mask=b["mask"])
    assert float(f["loss"][0]) == pytest.approx(float(fc["loss"][0]), rel=1e-5)
    assert_grad_close(torch.from_numpy(cp.asnumpy(grad)), torch.from_numpy(gc), 1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and vespo_ext._cuda")
def test_dlpack_api_on_torch_cuda_tensors_of_every_visible_gpu():
    """dlpack_api on torch CUDA tensors (exported with stream -1, launched on torch's current stream), on each
    visible GPU whatever the current device: torch exports a CUDA tensor only from its own device, and the
    kernels launch on the current one, so the API makes the logits' device current."""
    api = _dlpack_api()
    b = np_batch([6, 3, 5], 129, seed=4)
    fc = api.forward(b["logits"], b["labels"], b["old"], b["adv"], b["cu"], mask=b["mask"], rollout_is_weights=b["isw"])
    gc = api.backward(b["logits"], b["labels"], fc, mask=b["mask"])
    for i in range(torch.cuda.device_count()):
        d = {k: (None if v is None else torch.from_numpy(v).to(f"cuda:{i}")) for k, v in b.items()}
        with torch.cuda.device(0):
            f = api.forward(d["logits"], d["labels"], d["old"], d["adv"], d["cu"].to(torch.int32), mask=d["mask"],
                            rollout_is_weights=d["isw"])
            grad = api.backward(d["logits"], d["labels"], f, mask=d["mask"])
        assert grad.device == d["logits"].device and f["loss"].device == d["logits"].device
        assert float(f["loss"][0]) == pytest.approx(float(fc["loss"][0]), rel=1e-5)
        assert_grad_close(grad.cpu(), torch.from_numpy(gc), 1e-5)
