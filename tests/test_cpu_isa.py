"""The CPU kernels' code paths: AVX-512 (+ AVX512_BF16), AVX2 and the baseline loops (issue #18, part 3).

One build holds all of them and picks the best the CPU runs; VESPO_CPU_ISA caps the choice, so
every path this CPU can run is checked here, each in a subprocess (the choice is made per call,
but a subprocess also proves the variable works from the environment). Each path must meet the
same float64 budgets as the default one: the confident-row bias at V = 151936 (mean signed
per-token error <= 1e-8, as tests/test_confident_rows.py for the default path), and loss,
gradient, log-probs and entropy on an odd-V batch (every loop tail length), in every dtype, with
temperature, -inf logits, a near-certain label and masked tokens. avx512bf16 (avx512 with the
bf16 gradient stored by vcvtneps2bf16) must equal avx512 bit for bit, and every path's bf16 store
must round as the software round-to-nearest-even does on ties, subnormals, overflow and NaN. The
fp32 backward's streamed (non-temporal) stores must write the same bits as plain ones.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vespo_ext import reference as R

from conftest import assert_grad_close, assert_loss_close, grad_tol_for, make_packed, to_double, vespo_loss_scale

_core = pytest.importorskip("vespo_ext._core")
ISAS = ("avx512bf16", "avx512", "avx2", "generic")
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
    if name == "store" or name.startswith("aligned_"):
        continue
    x = batch["logits"].clone().requires_grad_(True)
    args = {k: v for k, v in batch.items() if k != "logits"}
    loss = vespo_ext.vespo_loss(x, temperature=%(temp)r, **args)
    loss.backward()
    logp, ent = vespo_ext.token_logprobs(batch["logits"], batch["labels"], temperature=%(temp)r, return_entropy=True)
    out[name] = dict(loss=loss.detach(), grad=x.grad, logp=logp, entropy=ent)
# The streamed fp32 gradient stores (VESPO_CPU_STREAM_MIN_BYTES=0: always; 2^62: never) write the same
# bits as the plain ones: on rows aligned to the vector size (V = 2048) and on an odd V, whose rows are
# aligned one in 16 (one in 8 at 8 lanes; the others take plain stores).
import os
for name in ("aligned_fp32", "aligned_bf16", "fp32"):
    batch = inp[name]
    args = {k: v for k, v in batch.items() if k != "logits"}
    for nt in ("0", str(1 << 62)):
        os.environ["VESPO_CPU_STREAM_MIN_BYTES"] = nt
        x = batch["logits"].clone().requires_grad_(True)
        vespo_ext.vespo_loss(x, temperature=%(temp)r, **args).backward()
        out.setdefault("stream_" + name, []).append(x.grad)
    del os.environ["VESPO_CPU_STREAM_MIN_BYTES"]
# The bf16 store: g[t, v] = -dlogp[t] * p with p = 1 (logit 0 = row max, log s = 0) or 0 (-inf logit).
vals, z = inp["store"]["vals"], inp["store"]["logits"]
T, zeros = z.shape[0], torch.zeros(z.shape[0])
g = torch.empty_like(z)
_core.logprob_bwd(z, torch.full((T,), -100, dtype=torch.long), None, zeros, zeros, -vals, torch.ones(1), g,
                  inv_temperature=1.0, row_max=zeros, log_sum=zeros)
out["store"] = g
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


def _aligned_batch(dtype):
    """V = 2048: every row of a fresh gradient starts on a 64-byte boundary. Labels in the first, a
    middle and the last vector (lanes 0, 15, 16, 2047, ...), ignored and masked rows."""
    torch.manual_seed(12)
    inp = make_packed([5, 16, 3, 9], V=2048, dtype=torch.float32, temperature=TEMP)
    inp["labels"][:8] = torch.tensor([0, 15, 16, 17, 1023, 2032, 2046, 2047])
    inp["labels"][8] = -100
    inp["mask"][8] = False
    inp["logits"] = inp["logits"].to(dtype)
    return inp


def _store_case():
    """fp32 values for the bf16 store, one per row (V = 37: two 16-lane vectors and a scalar tail),
    with 0 in random lanes: rounding ties, subnormals (the instruction flushes them to zero), values
    that round up to the smallest normal or overflow to inf, NaNs of both signs and payloads (the
    instruction keeps them), inf, and random bit patterns of every exponent."""
    g = np.random.default_rng(5)
    bits = [0x3F808000, 0x3F818000, 0x3F80C000, 0x3F804000, 0x007F8000, 0x007FFFFF, 0x00008000, 0x00018000,
            0x00000001, 0x800AE398, 0x7F7F8000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000,
            0xFFC12345, 0x7F800001, 0x00800000, 0x80800000]
    bits += list(g.integers(1, 1 << 23, 300) | (g.integers(0, 2, 300) << 31))  # subnormals
    bits += list((g.integers(0, 1 << 16, 300) << 16) | 0x8000)  # exact ties
    bits += list(g.integers(0, 1 << 32, 1500))  # anything
    vals = torch.from_numpy(np.array(bits, dtype=np.uint32).view(np.float32)).clone()
    vals[vals == 0] = 1.0  # a zero dlogp row is written by memset, not by the store
    z = torch.zeros(len(bits), 37)
    z[torch.rand(z.shape, generator=torch.Generator().manual_seed(5)) < 0.25] = float("-inf")
    return dict(vals=vals, logits=z.to(torch.bfloat16))


def _bf16_rne(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bits, round to nearest even on every finite value, NaN -> 0x7FC0."""
    u = x.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), r)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{isa: the child's outputs} for every path this CPU runs."""
    d = tmp_path_factory.mktemp("isa")
    batches = {name: _batch(dt) for name, dt in DTYPES.items()}
    aligned = {"aligned_fp32": _aligned_batch(torch.float32), "aligned_bf16": _aligned_batch(torch.bfloat16)}
    torch.save(dict(batches, store=_store_case(), **aligned), d / "in.pt")
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
            # avx512bf16 where the compiler took it (CMakeLists.txt's check): then the CPU flag decides
            env = dict(os.environ, VESPO_CPU_ISA="avx512bf16")
            r = subprocess.run([sys.executable, "-c", "from vespo_ext import _core; print(_core.cpu_isa())"],
                               env=env, capture_output=True, text=True, timeout=120)
            built = r.stdout.strip() == "avx512bf16"
            if " avx512_bf16 " in flags and built:
                assert _core.cpu_isa() == "avx512bf16"
            else:
                assert _core.cpu_isa() == "avx512"


def test_a_bad_isa_name_is_a_clear_error():
    env = dict(os.environ, VESPO_CPU_ISA="avx1024")
    code = "import torch, vespo_ext; vespo_ext.token_logprobs(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "VESPO_CPU_ISA must be avx512bf16, avx512, avx2 or generic" in r.stderr and "avx1024" in r.stderr


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


def test_the_bf16_hardware_store_equals_avx512_bitwise(runs):
    """avx512bf16 differs from avx512 only in how the bf16 gradient is stored: equal bit for bit."""
    _, out = runs
    if "avx512bf16" not in out:
        pytest.skip("this CPU or build has no avx512bf16 path")
    a, b = out["avx512bf16"], out["avx512"]
    for dtype in DTYPES:
        for k in ("loss", "grad", "logp", "entropy"):
            bits = torch.int32 if a[dtype][k].dtype == torch.float32 else torch.int16
            assert torch.equal(a[dtype][k].view(bits), b[dtype][k].view(bits)), (dtype, k)
    for dtype in ("fp32", "bf16"):
        assert torch.equal(a["conf_" + dtype], b["conf_" + dtype])


@pytest.mark.parametrize("isa", ISAS)
def test_the_bf16_store_rounds_every_value_to_nearest_even(runs, isa):
    """Ties to even, subnormals rounded (not flushed), overflow to inf, one quiet NaN: on every path."""
    batches, out = runs
    if isa not in out:
        pytest.skip(f"this CPU does not run the {isa} path")
    case = _store_case()
    p = np.where(np.isinf(case["logits"].float().numpy()), np.float32(0), np.float32(1))
    with np.errstate(invalid="ignore"):
        want = _bf16_rne((case["vals"].numpy()[:, None] * p).astype(np.float32))
    got = out[isa]["store"].view(torch.int16).numpy().view(np.uint16)
    bad = np.argwhere(got != want)
    assert bad.size == 0, [(f"{case['vals'][i].view(torch.int32).item() & 0xFFFFFFFF:08x}", int(j), f"{got[i, j]:04x}",
                            f"{want[i, j]:04x}") for i, j in bad[:10]]


@pytest.mark.parametrize("isa", ISAS)
def test_streamed_gradient_stores_write_the_same_bits(runs, isa):
    """The fp32 backward streams a large fresh gradient to memory (non-temporal stores, rows aligned to
    the vector size); the bits must not depend on it, nor on which rows were aligned."""
    batches, out = runs
    if isa not in out:
        pytest.skip(f"this CPU does not run the {isa} path")
    for name in ("aligned_fp32", "aligned_bf16", "fp32"):
        streamed, plain = out[isa]["stream_" + name]
        bits = torch.int32 if streamed.dtype == torch.float32 else torch.int16
        assert torch.equal(streamed.view(bits), plain.view(bits)), (isa, name)
    assert torch.equal(out[isa]["stream_fp32"][1], out[isa]["fp32"]["grad"])


def test_the_stream_threshold_variable_is_checked():
    env = dict(os.environ, VESPO_CPU_STREAM_MIN_BYTES="64MB")
    code = ("import torch, vespo_ext; x = torch.zeros(2, 5, requires_grad=True); "
            "vespo_ext.vespo_loss(x, torch.zeros(2, dtype=torch.long), torch.zeros(2), torch.ones(1), "
            "cu_seqlens=torch.tensor([0, 2])).backward()")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "VESPO_CPU_STREAM_MIN_BYTES must be a byte count" in r.stderr and "64MB" in r.stderr
