"""`python -m vespo_ext` (vespo_ext._doctor): the report, its NumPy reference, and its verdicts."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import vespo_ext
from vespo_ext import _doctor
from vespo_ext import reference as R


def _run_module(*pre: str) -> subprocess.CompletedProcess:
    """python -m vespo_ext in a child that imports the same vespo_ext as this process."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(vespo_ext.__file__)))
    code = "; ".join([*pre, "import runpy, sys", "sys.argv = ['vespo_ext']",
                      "runpy.run_module('vespo_ext', run_name='__main__', alter_sys=True)"])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=os.path.dirname(__file__))


def test_python_m_vespo_ext_reports_and_passes():
    r = _run_module()
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert f"vespo_ext {vespo_ext.__version__}" in out
    assert f"torch     {torch.__version__}" in out
    for line in ("cpu  numpy  (dlpack_api)", "cpu  torch  (vespo_loss)"):
        row = next(x for x in out.splitlines() if line in x)
        assert " ok " in row, row
    assert "CPU code paths" in out and out.rstrip().endswith("result: OK")


def test_python_m_vespo_ext_without_torch():
    """torch made unimportable: the report says so and the NumPy path still checks the kernels."""
    r = _run_module("import sys", "sys.modules['torch'] = None")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "torch     not installed" in r.stdout
    assert "cpu  torch" not in r.stdout
    assert " ok " in next(x for x in r.stdout.splitlines() if "cpu  numpy" in x)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_numpy_reference_matches_torch_reference(seed, temperature):
    c = _doctor.small_case(seed=seed, lengths=(4, 9, 1, 6), V=53)
    c["adv"][1] = -abs(c["adv"][1])  # both (k, lambda) branches
    c["adv"][0] = abs(c["adv"][0])
    loss, grad = _doctor.reference_vespo_numpy(c["logits"], c["labels"], c["old"], c["adv"], c["cu"], c["mask"],
                                               temperature)
    z = torch.from_numpy(c["logits"]).double().requires_grad_(True)
    t = lambda a: torch.from_numpy(a).double()  # noqa: E731
    ref = R.vespo_loss(z, torch.from_numpy(c["labels"]), t(c["old"]), t(c["adv"]), torch.from_numpy(c["mask"]),
                       cu_seqlens=torch.from_numpy(c["cu"]), temperature=temperature)
    ref.backward()
    assert loss == pytest.approx(float(ref.detach()), rel=1e-12, abs=1e-15)
    np.testing.assert_allclose(grad, z.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_compare_flags_errors_over_budget():
    c = _doctor.small_case()
    loss, grad = _doctor.reference_vespo_numpy(c["logits"], c["labels"], c["old"], c["adv"], c["cu"], c["mask"])
    assert _doctor.compare(loss, grad, loss, grad)[0]
    bumped = grad.copy()
    bumped[3, 5] += 1e-3 * np.abs(grad).max()
    assert not _doctor.compare(loss, bumped, loss, grad)[0]
    assert not _doctor.compare(loss * (1 + 1e-3), grad, loss, grad)[0]
    assert not _doctor.compare(float("nan"), grad, loss, grad)[0]


@pytest.mark.parametrize("cc,want", [((8, 0), "sm_80 SASS"), ((8, 6), "sm_80 SASS"), ((8, 9), "sm_80 SASS"),
                                     ((9, 0), "sm_90 SASS"), ((10, 0), "PTX"), ((12, 0), "PTX"), ((7, 5), "NOT")])
def test_gpu_coverage_of_the_built_archs(cc, want):
    assert _doctor._runs_on(cc, "80-real;90-real;90-virtual").startswith(want)


@pytest.mark.parametrize("cc,spec,want", [((9, 0), "90a-real", "sm_90a SASS"), ((9, 2), "90a-real", "NOT"),
                                          ((9, 0), "90", "sm_90 SASS"), ((10, 0), "90", "PTX"),
                                          ((10, 3), "100f-real", "sm_100f SASS"), ((9, 0), "native", "unknown"),
                                          ((9, 0), "all-major", "unknown")])
def test_gpu_coverage_of_other_cmake_arch_spellings(cc, spec, want):
    """CMAKE_CUDA_ARCHITECTURES as a user may set it (arch-specific 90a, plain 90 = SASS + PTX, native): the
    GPU lines of `python -m vespo_ext` must not crash on them (int("90a") did)."""
    assert _doctor._runs_on(cc, spec).startswith(want)


def test_cpu_isa_line(monkeypatch):
    core = pytest.importorskip("vespo_ext._core")
    monkeypatch.delenv("VESPO_CPU_ISA", raising=False)
    line = _doctor._cpu_isa_line(core, ("avx512", "avx2", "generic"))
    assert line.startswith("CPU code paths avx512, avx2, generic; this CPU runs ")
    assert line.split("runs ")[1] in ("avx512bf16", "avx512", "avx2", "generic")
    monkeypatch.setenv("VESPO_CPU_ISA", "generic")
    assert _doctor._cpu_isa_line(core, ("generic",)).endswith("runs generic (VESPO_CPU_ISA=generic)")
    monkeypatch.setenv("VESPO_CPU_ISA", "sse9")
    assert "VESPO_CPU_ISA must be avx512bf16, avx512, avx2 or generic" in _doctor._cpu_isa_line(core, ("generic",))


def test_build_info_of_an_installed_build():
    """A pip-built install carries vespo_ext/_build_info.py (CMakeLists.txt writes it); a dev tree may not."""
    info = pytest.importorskip("vespo_ext._build_info", reason="not a pip-built install")
    assert info.version == vespo_ext.__version__
    assert info.cpu_isas in (("avx512bf16", "avx512", "avx2", "generic"), ("avx512", "avx2", "generic"), ("generic",))
    if info.cuda_built:  # the release archs are checked by tools/build_wheels.sh; a local build may differ
        assert info.cuda_architectures and info.cuda_runtime == "Static"
        assert _doctor._cuda_archs(info.cuda_architectures).startswith(("SASS", "PTX"))
