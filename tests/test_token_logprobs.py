"""vespo_ext.token_logprobs against torch.log_softmax in float64 on the same values."""
from __future__ import annotations

import pytest
import torch

import vespo_ext

ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def ref_logprobs(logits, labels, temperature=1.0, ignore_index=-100):
    x = logits.double() / temperature
    logp_all = torch.log_softmax(x, -1)
    valid = labels != ignore_index
    logp = logp_all.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).nan_to_num(0.0).sum(-1)
    return torch.where(valid, logp, 0.0), entropy


def assert_close_lp(out, ref, logits, what):
    """fp32 math: a few ulp of the row's log-sum-exp magnitude."""
    assert out.dtype in (torch.float32, torch.float64)
    scale = 1.0 + logits.double().abs().amax(-1).cpu()
    err = (out.double().cpu() - ref.cpu()).abs()
    assert bool((err <= 2e-6 * scale).all()), f"{what}: max err {float(err.max()):.3g}"


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
@pytest.mark.parametrize("shape", [(9,), (3, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("V", [1, 2, 31, 1000])
def test_matches_log_softmax(device, dtype, temperature, shape, V):
    logits = (torch.randn(*shape, V) * 3).to(device=device, dtype=dtype)
    labels = torch.randint(0, V, shape, device=device)
    logp, ent = vespo_ext.token_logprobs(logits, labels, temperature=temperature, return_entropy=True)
    only = vespo_ext.token_logprobs(logits, labels, temperature=temperature)
    assert logp.shape == shape and ent.shape == shape and only.shape == shape
    assert not logp.requires_grad
    r_lp, r_ent = ref_logprobs(logits, labels, temperature)
    assert_close_lp(logp, r_lp, logits / temperature, "logp")
    assert_close_lp(only, r_lp, logits / temperature, "logp (no entropy)")
    assert_close_lp(ent, r_ent, logits / temperature, "entropy")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_vocab_of_one(device, dtype, temperature):
    """V = 1: log softmax is exactly 0 (as torch.log_softmax gives), entropy exactly 0."""
    logits = (torch.randn(3, 5, 1) * 3).to(device=device, dtype=dtype)
    labels = torch.zeros(3, 5, dtype=torch.long, device=device)
    logp, ent = vespo_ext.token_logprobs(logits, labels, temperature=temperature, return_entropy=True)
    assert torch.count_nonzero(torch.log_softmax(logits.double() / temperature, -1)) == 0
    assert torch.count_nonzero(logp) == 0, logp
    assert torch.count_nonzero(ent) == 0, ent


def test_matches_reference_module(device):
    logits = torch.randn(4, 6, 50, device=device)
    labels = torch.randint(0, 50, (4, 6), device=device)
    a = vespo_ext.token_logprobs(logits, labels, temperature=0.8, return_entropy=True)
    b = vespo_ext.reference.token_logprobs(logits.double(), labels, temperature=0.8, return_entropy=True)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.double(), y, rtol=1e-5, atol=1e-5)


def test_requires_grad_input_gives_no_grad_output(device):
    logits = torch.randn(5, 7, device=device, requires_grad=True)
    out = vespo_ext.token_logprobs(logits, torch.randint(0, 7, (5,), device=device))
    assert not out.requires_grad


def test_large_and_shifted_logits(device):
    """Big offsets (1e4) and near-one-hot rows: no overflow, confident tokens give log p ~ 0."""
    logits = torch.randn(6, 257, device=device) + 1e4
    logits[0, 3] += 60.0
    labels = torch.randint(0, 257, (6,), device=device)
    labels[0] = 3
    out, ent = vespo_ext.token_logprobs(logits, labels, return_entropy=True)
    r_lp, r_ent = ref_logprobs(logits, labels)
    assert torch.isfinite(out).all() and torch.isfinite(ent).all()
    torch.testing.assert_close(out.double(), r_lp, rtol=0, atol=5e-3)  # 1e4 in fp32 has ulp 1e-3
    assert abs(float(out[0])) < 1e-6


def test_neg_inf_logits(device):
    logits = torch.randn(4, 9, device=device)
    logits[:, :3] = float("-inf")  # e.g. a vocabulary restriction
    labels = torch.tensor([3, 4, 8, 0], device=device)  # the last picks a -inf logit
    out = vespo_ext.token_logprobs(logits, labels)
    r_lp, _ = ref_logprobs(logits, labels)
    assert out[3] == float("-inf")
    assert_close_lp(out[:3], r_lp[:3], logits[:3].clamp(min=-10), "logp")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["kernel", "reference"])
def test_neg_inf_logits_entropy(device, dtype):
    """Entropy with -inf logits (probability exactly 0, 0 * log 0 = 0) is finite, not NaN."""
    logits = torch.randn(4, 9, device=device, dtype=dtype)
    logits[:, :3] = float("-inf")
    labels = torch.tensor([3, 4, 8, 5], device=device)
    _, ent = vespo_ext.token_logprobs(logits, labels, return_entropy=True)
    _, r_ent = ref_logprobs(logits, labels)
    assert torch.isfinite(r_ent).all()
    assert_close_lp(ent, r_ent, logits[:, 3:], "entropy")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_ignore_index_default_gives_zero(device, dtype):
    logits = torch.randn(2, 5, 11, device=device).to(dtype)
    labels = torch.randint(0, 11, (2, 5), device=device)
    labels[0, 1] = labels[1, 4] = -100
    out = vespo_ext.token_logprobs(logits, labels)
    assert out[0, 1] == 0 and out[1, 4] == 0
    r_lp, _ = ref_logprobs(logits, labels)
    assert_close_lp(out, r_lp, logits, "logp")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_custom_ignore_index(device, dtype):
    logits = torch.randn(8, 11, device=device).to(dtype)
    labels = torch.tensor([2, 3, 2, 5, -1, 0, 10, 2], device=device)
    out = vespo_ext.token_logprobs(logits, labels, ignore_index=-1)
    assert out[4] == 0
    assert_close_lp(out, ref_logprobs(logits, labels, ignore_index=-1)[0], logits, "ignore_index=-1")
    with pytest.raises(IndexError, match="labels"):  # -100 is no longer ignored
        vespo_ext.token_logprobs(logits, torch.where(labels == -1, -100, labels), ignore_index=-1)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_ignore_index_inside_vocab(device, dtype):
    """Labels equal to ignore_index give 0 (the docstring's contract and the reference's behaviour),
    also when ignore_index happens to be a valid class id."""
    logits = torch.randn(8, 11, device=device).to(dtype)
    labels = torch.tensor([2, 3, 2, 5, 1, 0, 10, 2], device=device)
    ref = vespo_ext.reference.token_logprobs(logits.double(), labels, ignore_index=2)
    assert [float(ref[i]) for i in (0, 2, 7)] == [0.0, 0.0, 0.0]
    out = vespo_ext.token_logprobs(logits, labels, ignore_index=2)
    assert [float(out[i]) for i in (0, 2, 7)] == [0.0, 0.0, 0.0]
    assert_close_lp(out, ref_logprobs(logits, labels, ignore_index=2)[0], logits, "ignore_index=2")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("bad", [-1, 11, 10**12, -100])
def test_out_of_range_label_raises(device, dtype, bad):
    logits = torch.randn(2, 4, 11, device=device).to(dtype)
    labels = torch.randint(0, 11, (2, 4), device=device)
    labels[1, 2] = bad
    ignore = -100 if bad != -100 else -7
    with pytest.raises(IndexError, match="labels"):
        vespo_ext.token_logprobs(logits, labels, ignore_index=ignore)


def test_cu_seqlens_accepted_and_checked(device):
    logits = torch.randn(7, 5, device=device)
    labels = torch.randint(0, 5, (7,), device=device)
    cu = torch.tensor([0, 3, 7], device=device)
    torch.testing.assert_close(vespo_ext.token_logprobs(logits, labels, cu_seqlens=cu),
                               vespo_ext.token_logprobs(logits, labels))
    with pytest.raises(ValueError, match="cu_seqlens"):
        vespo_ext.token_logprobs(logits, labels, cu_seqlens=torch.tensor([0, 3, 6], device=device))


def assert_same_up_to_row_alignment(a, b, device):
    """CPU: bitwise equal. CUDA: a row's 16-byte alignment decides which elements a thread reads as a
    vector, hence the order of the row's sum: a strided view may differ from its contiguous copy in
    the last bits (each layout is still deterministic run to run)."""
    for x, y in zip(a, b):
        if torch.device(device).type == "cpu":
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_non_contiguous_logits(device):
    big = torch.randn(3, 4, 40, device=device)
    logits = big[:, :, 5:30]
    labels = torch.randint(0, 25, (3, 4), device=device)
    a = vespo_ext.token_logprobs(logits, labels, return_entropy=True)
    b = vespo_ext.token_logprobs(logits.contiguous(), labels, return_entropy=True)
    assert_same_up_to_row_alignment(a, b, device)
    t = torch.randn(40, 6, device=device).t()  # (6, 40) with unit stride along rows, not along V
    lt = torch.randint(0, 40, (6,), device=device)
    assert torch.equal(vespo_ext.token_logprobs(t, lt), vespo_ext.token_logprobs(t.contiguous(), lt))


def test_empty(device):
    out, ent = vespo_ext.token_logprobs(torch.randn(0, 5, device=device), torch.zeros(0, dtype=torch.long,
                                                                                       device=device),
                                        return_entropy=True)
    assert out.shape == (0,) and ent.shape == (0,)


def test_int32_labels(device):
    logits = torch.randn(6, 9, device=device)
    labels = torch.randint(0, 9, (6,), device=device)
    assert torch.equal(vespo_ext.token_logprobs(logits, labels.int()), vespo_ext.token_logprobs(logits, labels))


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_logp_never_positive(device, temperature):
    """log pi <= 0 always; confident tokens (p ~ 1) must not round to log pi > 0."""
    x = torch.randn(4096, 3, device=device) * 3
    x[:, 0] += torch.rand(4096, device=device) * 100
    labels = torch.zeros(4096, dtype=torch.long, device=device)
    lp = vespo_ext.token_logprobs(x, labels, temperature=temperature)
    assert float(lp.max()) <= 0.0, f"{int((lp > 0).sum())} tokens with log p > 0 (max {float(lp.max()):.3g})"
