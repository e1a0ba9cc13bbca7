"""The run-time choice of the CUDA log-prob kernels' generation (VESPO_CUDA_KERNELS /
vespo_ext._cuda.set_kernel_variant). Host-only: nothing here launches a kernel, so it runs wherever
the CUDA module was built (skipped where it was not). The kernels themselves are checked per variant
by the `device` fixture's "cuda" / "cuda-v2" parameters (conftest.py) on a GPU."""
import pytest

_cuda = pytest.importorskip("vespo_ext._cuda", reason="the CUDA module was not built")

VARIANTS = ("v1", "v2", "v2-mufu", "v2-split")


@pytest.fixture(autouse=True)
def _follow_env():
    _cuda.set_kernel_variant(None)
    yield
    _cuda.set_kernel_variant(None)


def test_default_is_v1(monkeypatch):
    monkeypatch.delenv("VESPO_CUDA_KERNELS", raising=False)
    assert _cuda.kernel_variant() == "v1"
    monkeypatch.setenv("VESPO_CUDA_KERNELS", "")
    assert _cuda.kernel_variant() == "v1"


@pytest.mark.parametrize("name", VARIANTS)
def test_environment_is_read_at_every_call(monkeypatch, name):
    monkeypatch.setenv("VESPO_CUDA_KERNELS", name)
    assert _cuda.kernel_variant() == name


def test_setter_overrides_the_environment(monkeypatch):
    monkeypatch.setenv("VESPO_CUDA_KERNELS", "v1")
    for name in VARIANTS:
        _cuda.set_kernel_variant(name)
        assert _cuda.kernel_variant() == name
    _cuda.set_kernel_variant(None)  # back to the environment
    assert _cuda.kernel_variant() == "v1"
    _cuda.set_kernel_variant("")
    assert _cuda.kernel_variant() == "v1"


@pytest.mark.parametrize("bad", ["v3", "V2", "v2 ", "mufu"])
def test_bad_environment_value_names_the_variable(monkeypatch, bad):
    monkeypatch.setenv("VESPO_CUDA_KERNELS", bad)
    with pytest.raises(ValueError, match=r"VESPO_CUDA_KERNELS must be v1, v2, v2-mufu or v2-split \(or unset\)"):
        _cuda.kernel_variant()
    _cuda.set_kernel_variant("v2")  # an explicit choice does not read the environment
    assert _cuda.kernel_variant() == "v2"


def test_bad_setter_name(monkeypatch):
    monkeypatch.delenv("VESPO_CUDA_KERNELS", raising=False)
    with pytest.raises(ValueError, match="set_kernel_variant: name must be v1, v2, v2-mufu or v2-split"):
        _cuda.set_kernel_variant("fast")
    assert _cuda.kernel_variant() == "v1"  # unchanged


def test_doctor_names_the_variant(monkeypatch):
    from vespo_ext import _doctor

    monkeypatch.setenv("VESPO_CUDA_KERNELS", "v2-split")
    assert _doctor._cuda_kernels_line(_cuda) == "log-prob kernels v2-split"
    monkeypatch.setenv("VESPO_CUDA_KERNELS", "nope")
    assert "VESPO_CUDA_KERNELS must be" in _doctor._cuda_kernels_line(_cuda)
