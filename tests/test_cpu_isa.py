"""The CPU kernels' code paths: AVX-512, AVX2 and the baseline loops (issue #18, part 3).

One build holds all three and picks the best the CPU runs; VESPO_CPU_ISA caps the choice, so
every path this CPU can run is checked here, each in a subprocess (the choice is made per call,
but a subprocess also proves the variable works from the environment). Each path must meet the
same float64 budgets as the default one: the confident-row bias at V = 151936 (mean signed
per-token error <= 1e-8, as tests/test_confident_rows.py for the default path), and loss,
gradient, log-probs and entropy on an odd-V batch (every loop tail length), in every dtype, with
temperature, -inf logits, a near-certain label and masked tokens.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vespo_ext import reference as R

from conftest import assert_grad_close, assert_loss_close, grad_tol_for, make_packed, to_double, vespo_loss_scale

_core = pytest.importorskip("vespo_ext._core")
ISAS = ("avx512", "avx2", "generic")
TESTS = Path(__file__).resolve().parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEMP = 0.7

# Run in the child: the op on the inputs the parent saved, every dtype; results saved back.
CHILD = r"""
import sys, json, torch, vespo_ext
from vespo_ext import _core
sys.path.insert(0, sys.argv[3])
from test_confident_rows import confident_batch
inp = torch.load(sys.argv[1])
out = {"isa": _core.cpu_isa()}
for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    logits, labels, _ = confident_batch(512, dt, "cpu")
    out["conf_" + name] = vespo_ext.token_logprobs(logits, labels)
    del logits
for name, batch in inp.items():
    x = batch["logits"].clone().requires_grad_(True)
    args = {k: v for k, v in batch.items() if k != "logits"}
    loss = vespo_ext.vespo_loss(x, temperature=%(temp)r, **args)
    loss.backward()
    logp, ent = vespo_ext.token_logprobs(batch["logits"], batch["labels"], temperature=%(temp)r, return_entropy=True)
    out[name] = dict(loss=loss.detach(), grad=x.grad, logp=logp, entropy=ent)
torch.save(out, sys.argv[2])
""" % {"temp": TEMP}


def _batch(dtype):
    torch.manual_seed(11)
    inp = make_packed([1, 7, 16, 17, 31, 33, 64, 34], V=1003, dtype=torch.float32, temperature=TEMP)
    z = inp["logits"]
    z[3, torch.randperm(1003)[:200]] = float("-inf")  # -inf logits inside a counted row
    z[40, inp["labels"][40]] += 30.0  # a near-certain label
    inp["logits"] = z.to(dtype)
    return inp


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{isa: the child's outputs} for every path this CPU runs."""
    d = tmp_path_factory.mktemp("isa")
    batches = {name: _batch(dt) for name, dt in DTYPES.items()}
    torch.save(batches, d / "in.pt")
    best = _core.cpu_isa()
    out = {}
    for isa in ISAS[ISAS.index(best):]:
        env = dict(os.environ, VESPO_CPU_ISA=isa)
        r = subprocess.run([sys.executable, "-c", CHILD, str(d / "in.pt"), str(d / f"{isa}.pt"), str(TESTS)],
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        out[isa] = torch.load(d / f"{isa}.pt")
        assert out[isa]["isa"] == isa
    return batches, out


def test_the_best_path_is_the_default():
    assert _core.cpu_isa() in ISAS
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if " avx512f " in flags and " avx512bw " in flags and " avx512vl " in flags and " avx512dq " in flags:
        if sys.platform == "linux" and os.uname().machine == "x86_64" and "VESPO_CPU_ISA" not in os.environ:
            assert _core.cpu_isa() == "avx512"


def test_a_bad_isa_name_is_a_clear_error():
    env = dict(os.environ, VESPO_CPU_ISA="avx1024")
    code = "import torch, vespo_ext; vespo_ext.token_logprobs(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "VESPO_CPU_ISA must be avx512, avx2 or generic" in r.stderr and "avx1024" in r.stderr


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_confident_rows_unbiased_on_every_path(runs, isa, dtype):
    _, out = runs
    if isa not in out:
        pytest.skip(f"this CPU does not run the {isa} path")
    from test_confident_rows import confident_batch, ref_logp
    logits, labels, _ = confident_batch(512, DTYPES[dtype], "cpu")
    err = out[isa]["conf_" + dtype].double() - ref_logp(logits, labels)
    assert abs(float(err.mean())) <= 1e-8, f"{isa} {dtype}: mean signed per-token error {float(err.mean()):.3g}"
    assert float(err.abs().max()) <= 2e-7


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_loss_grad_logp_entropy_on_every_path(runs, isa, dtype):
    batches, out = runs
    if isa not in out:
        pytest.skip(f"this CPU does not run the {isa} path")
    inp, got = batches[dtype], out[isa][dtype]
    d = to_double(inp)
    x = d.pop("logits").requires_grad_(True)
    loss_ref = R.vespo_loss(x, temperature=TEMP, **d)
    loss_ref.backward()
    assert_loss_close(got["loss"], loss_ref, vespo_loss_scale(inp, temperature=TEMP), 2e-4)
    assert_grad_close(got["grad"], x.grad, grad_tol_for(DTYPES[dtype]))
    lp_ref, ent_ref = R.token_logprobs(inp["logits"].double(), inp["labels"], temperature=TEMP, return_entropy=True)
    assert torch.allclose(got["logp"].double(), lp_ref, rtol=0, atol=2e-5)
    assert torch.allclose(got["entropy"].double(), ent_ref, rtol=0, atol=2e-5)


def test_the_vector_paths_agree(runs):
    """AVX-512 and AVX2 differ only in the summation order across lanes: close, not equal."""
    _, out = runs
    if "avx2" not in out or "avx512" not in out:
        pytest.skip("needs an AVX-512 CPU")
    for dtype in DTYPES:
        a, b = out["avx512"][dtype], out["avx2"][dtype]
        assert torch.allclose(a["logp"], b["logp"], rtol=4e-7, atol=1e-7), float((a["logp"] - b["logp"]).abs().max())
        assert torch.allclose(a["grad"].float(), b["grad"].float(), rtol=0,
                              atol=1e-6 if dtype == "fp32" else 1e-2 * float(a["grad"].float().abs().max()))
