"""`python -m vespo_ext`: what this install holds and whether it works here.

Prints the version, how the compiled modules were built (CPU code paths, CUDA archs, from the
CMake-written `_build_info.py`), which CPU code path this machine runs, whether a GPU is visible and
usable, the torch/CuPy versions found, and a tiny self-check of the fused forward and backward
against a float64 reference on every available device: the DLPack/NumPy path always (its
reference is NumPy, so it runs without torch), the torch op on CPU and CUDA when torch is there,
CuPy on CUDA when CuPy is there. Exit status 0 when everything that could run passed.
"""
from __future__ import annotations

import importlib
import os
import platform
import re
import sys
from typing import Callable, List, Tuple

import numpy as np

_LOSS_BUDGET, _GRAD_BUDGET = 2e-4, 2e-4  # relative to the loss / largest reference gradient (tests' budgets)


def _try_import(name: str):
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install raising anything else
        return None, f"{type(exc).__name__}: {exc}"


def _cpu_isa_line(core, isas) -> str:
    """The CPU code paths built, and the one this machine runs (the module's own choice)."""
    built = f"CPU code paths {', '.join(isas)}" if isas else "CPU code paths unknown"
    if core is None:
        return built
    try:
        run = core.cpu_isa()
    except ValueError as exc:  # a bad VESPO_CPU_ISA
        return f"{built}; {exc}"
    env = os.environ.get("VESPO_CPU_ISA")
    return f"{built}; this CPU runs {run}" + (f" (VESPO_CPU_ISA={env})" if env else "")


def _cuda_kernels_line(cuda) -> str:
    """The log-prob kernels' generation the CUDA launches use (VESPO_CUDA_KERNELS)."""
    if not hasattr(cuda, "kernel_variant"):  # a module built before the variants
        return "log-prob kernels v1"
    try:
        return f"log-prob kernels {cuda.kernel_variant()}"
    except ValueError as exc:  # a bad VESPO_CUDA_KERNELS
        return str(exc)


def _cuda_archs(spec: str) -> str:
    sass = [a.split("-")[0] for a in spec.split(";") if a.endswith("-real")]
    ptx = [a.split("-")[0] for a in spec.split(";") if a.endswith("-virtual")]
    parts = [f"SASS sm_{', sm_'.join(sass)}"] if sass else []
    parts += [f"PTX compute_{', compute_'.join(ptx)} (JIT-compiled for newer GPUs)"] if ptx else []
    return "; ".join(parts) or spec


def _arch(entry: str):
    """(number, suffix, kinds) of one CMake CUDA architecture ("90-real", "90a", "100f-virtual"; no suffix: SASS
    and PTX); None for an entry that names no number ("native", "all", "all-major")."""
    m = re.fullmatch(r"(\d+)([af]?)(?:-(real|virtual))?", entry.strip())
    if m is None:
        return None
    return int(m.group(1)), m.group(2), {m.group(3)} if m.group(3) else {"real", "virtual"}


def _runs_on(cc: Tuple[int, int], spec: str) -> str:
    """How a GPU of compute capability `cc` runs the built archs (SASS runs on its own major version; an
    arch-specific "a" build only on its own compute capability, a family "f" build on its major version)."""
    major, minor = cc
    archs = [a for a in map(_arch, spec.split(";")) if a is not None]
    if not archs:
        return f"unknown (built for {spec!r})"

    def fits(n: int, suffix: str, sass: bool) -> bool:
        if suffix == "a":
            return n == major * 10 + minor
        if sass or suffix == "f":
            return n // 10 == major and n % 10 <= minor
        return n <= major * 10 + minor

    for n, suffix, kinds in archs:
        if "real" in kinds and fits(n, suffix, True):
            return f"sm_{n}{suffix} SASS"
    if any("virtual" in kinds and fits(n, suffix, False) for n, suffix, kinds in archs):
        return "PTX, JIT-compiled by the driver on first use"
    return "NOT SUPPORTED by the built archs"


# ---- the NumPy reference (float64): VESPO, token-mean, per-sequence advantages ---------------
def reference_vespo_numpy(logits, labels, old_logp, adv, cu, mask, temperature=1.0,
                          k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0):
    """Loss and d loss / d logits of VESPO (SPEC.md; reference.py's math): W_i = exp(sum of log-ratios),
    phi = W^k e^{lam (1 - W)} (detached), loss = -sum_t phi_i A_i logp_t / n_tokens."""
    x = np.asarray(logits, np.float64) / temperature
    x = x - x.max(-1, keepdims=True)
    lsm = x - np.log(np.exp(x).sum(-1, keepdims=True))
    T = x.shape[0]
    lp = lsm[np.arange(T), labels]
    m = np.asarray(mask, bool)
    seq = np.repeat(np.arange(len(cu) - 1), np.diff(cu))
    log_ratio = np.where(m, np.clip(lp - old_logp, -20, 20), 0.0)
    log_w = np.clip(np.bincount(seq, log_ratio, minlength=len(cu) - 1), -20, 20)
    W = np.exp(log_w)
    pos = np.asarray(adv, np.float64) >= 0
    k = np.where(pos, k_pos, k_neg)
    lam = np.maximum(np.where(pos, lambda_pos, lambda_neg), 1e-4)
    phi = np.exp(lam + k * np.log(np.maximum(W, 1e-8)) - lam * W)
    n = max(int(m.sum()), 1)
    coef = np.where(m, phi[seq] * np.asarray(adv, np.float64)[seq], 0.0)
    loss = -(coef * lp).sum() / n
    onehot = np.zeros_like(x)
    onehot[np.arange(T), labels] = 1.0
    grad = (-coef / n)[:, None] * (onehot - np.exp(lsm)) / temperature
    return loss, grad


def small_case(seed=0, lengths=(5, 3, 7), V=37):
    rng = np.random.default_rng(seed)
    T = sum(lengths)
    logits = (rng.standard_normal((T, V)) * 2).astype(np.float32)
    labels = rng.integers(0, V, T).astype(np.int64)
    mask = rng.random(T) < 0.8
    mask[0] = True
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    lp = (x - np.log(np.exp(x).sum(-1, keepdims=True)))[np.arange(T), labels]
    old = (lp + 0.1 * rng.standard_normal(T)).astype(np.float32)
    adv = rng.standard_normal(len(lengths)).astype(np.float32)
    return dict(logits=logits, labels=labels, old=old, adv=adv, cu=cu, mask=mask)


def compare(loss, grad, ref_loss, ref_grad) -> Tuple[bool, str]:
    """The tests' budgets: loss within 2e-4 of its scale, gradient within 2e-4 of the largest reference entry."""
    le = abs(float(loss) - ref_loss) / max(abs(ref_loss), 1e-6)
    ge = float(np.max(np.abs(np.asarray(grad, np.float64) - ref_grad))) / max(float(np.max(np.abs(ref_grad))), 1e-12)
    ok = bool(np.isfinite(le) and np.isfinite(ge) and le <= _LOSS_BUDGET and ge <= _GRAD_BUDGET)
    return ok, f"loss rel.err {le:.1e}, grad err {ge:.1e} of max (budget {_LOSS_BUDGET:g})"


def check_dlpack(xp=np, to_host=np.asarray) -> Tuple[bool, str]:
    """dlpack_api forward + backward on `xp` arrays (NumPy, or CuPy on the GPU) vs the NumPy reference."""
    from . import dlpack_api

    c = small_case()
    ref_loss, ref_grad = reference_vespo_numpy(c["logits"], c["labels"], c["old"], c["adv"], c["cu"], c["mask"], 0.9)
    d = {k: xp.asarray(v) for k, v in c.items()}
    f = dlpack_api.forward(d["logits"], d["labels"], d["old"], d["adv"], d["cu"], mask=d["mask"], temperature=0.9)
    g = dlpack_api.backward(d["logits"], d["labels"], f, mask=d["mask"])
    return compare(to_host(f["loss"])[0], to_host(g), ref_loss, ref_grad)


def check_torch(torch, device: str) -> Tuple[bool, str]:
    """vespo_ext.vespo_loss (the torch op) forward + autograd backward vs reference.py in float64."""
    from . import ops
    from . import reference as R

    c = small_case(seed=1)
    t = {k: torch.from_numpy(v) for k, v in c.items()}
    z = t["logits"].clone().to(device).requires_grad_(True)
    args = (t["labels"].to(device), t["old"].to(device), t["adv"].to(device), t["mask"].to(device))
    out = ops.vespo_loss(z, *args, cu_seqlens=t["cu"].to(device), temperature=0.9)
    out.backward()
    z64 = torch.from_numpy(c["logits"]).double().requires_grad_(True)
    ref = R.vespo_loss(z64, t["labels"], t["old"].double(), t["adv"].double(), t["mask"], cu_seqlens=t["cu"],
                       temperature=0.9)
    ref.backward()
    return compare(float(out.detach().cpu()), z.grad.double().cpu().numpy(), float(ref.detach()), z64.grad.numpy())


def _run(name: str, fn: Callable[[], Tuple[bool, str]], results: List[bool], out) -> None:
    try:
        ok, msg = fn()
    except Exception as exc:  # noqa: BLE001 - a failed self-check is reported, not raised
        ok, msg = False, f"{type(exc).__name__}: {exc}"
    results.append(ok)
    print(f"  {name:<34} {'ok  ' if ok else 'FAIL'}  {msg}", file=out)


def main(argv=None, out=None) -> int:
    out = out or sys.stdout
    import vespo_ext

    from . import _backend

    p = lambda *a: print(*a, file=out)  # noqa: E731
    libc = " ".join(platform.libc_ver())
    p(f"vespo_ext {vespo_ext.__version__}  ({vespo_ext.__path__[0]})")
    p(f"python    {platform.python_version()} ({platform.python_implementation()}), "
      f"{platform.system()} {platform.machine()}, {libc or 'libc unknown'}")
    info, _ = _try_import("vespo_ext._build_info")
    problems = []
    if info is None:
        p("build     no _build_info.py: not a pip-built install (a development build with copied modules?)")
        isas, archs = None, None
    else:
        p(f"build     {info.build_type}, {info.cxx_compiler}, for Python {info.python}"
          + (f"; CUDA {info.cuda_compiler}, runtime {info.cuda_runtime}" if info.cuda_built else "; no CUDA module"))
        if info.version != vespo_ext.__version__:
            problems.append(f"compiled modules are from version {info.version}, the Python files {vespo_ext.__version__}")
        isas, archs = info.cpu_isas, (info.cuda_architectures if info.cuda_built else None)

    core, cuda = _backend._load("_core"), _backend._load("_cuda")
    p(f"_core     {'loaded' if core[0] else 'NOT LOADED: ' + str(core[1])}; {_cpu_isa_line(core[0], isas)}")
    if core[0] is None:
        problems.append("the CPU module does not load: reinstall (pip install --force-reinstall vespo)")
    if cuda[0] is not None:
        n = cuda[0].device_count()
        p(f"_cuda     loaded; {_cuda_archs(archs) if archs else 'archs unknown'}; CUDA devices visible: {n}; "
          f"{_cuda_kernels_line(cuda[0])}")
    elif archs:
        p(f"_cuda     NOT LOADED: {cuda[1]}")
        problems.append("the CUDA module was built but does not load")
    else:
        p("_cuda     not built (no nvcc at build time): GPU tensors use vespo_ext.reference")

    torch, terr = _try_import("torch")
    cupy, _ = _try_import("cupy")
    gpu = False
    if torch is not None:
        gpu = bool(torch.cuda.is_available())
        p(f"torch     {torch.__version__} (built for CUDA {torch.version.cuda or '-'}; GPU available: {gpu})")
    else:
        p(f"torch     not installed ({terr.split(':')[0]}): the torch op is unavailable, the DLPack API works")
    p(f"cupy      {cupy.__version__ if cupy is not None else 'not installed'}")
    if torch is not None and gpu:
        for i in range(torch.cuda.device_count()):
            cc = torch.cuda.get_device_capability(i)
            how = _runs_on(cc, archs) if archs else "no CUDA module"
            p(f"gpu {i}     {torch.cuda.get_device_name(i)}, sm_{cc[0]}{cc[1]}: runs {how}")
            if how.startswith("NOT"):
                problems.append(f"GPU {i} (sm_{cc[0]}{cc[1]}) is not covered by the built archs")

    p("self-check (fused forward + backward vs a float64 reference, VESPO, 3 sequences, V=37):")
    results: List[bool] = []
    if core[0] is not None:
        _run("cpu  numpy  (dlpack_api)", check_dlpack, results, out)
        if torch is not None:
            _run("cpu  torch  (vespo_loss)", lambda: check_torch(torch, "cpu"), results, out)
    cuda_ok = cuda[0] is not None and cuda[0].device_count() > 0
    if cuda_ok and torch is not None and gpu:
        _run("cuda torch  (vespo_loss)", lambda: check_torch(torch, "cuda"), results, out)
    if cuda_ok and cupy is not None:
        _run("cuda cupy   (dlpack_api)", lambda: check_dlpack(cupy, cupy.asnumpy), results, out)
    if not cuda_ok:
        p("  cuda                               skipped (no usable GPU with the CUDA module)")
    for msg in problems:
        p(f"PROBLEM: {msg}")
    good = all(results) and not problems
    p("result: OK" if good else "result: FAILED (see above)")
    return 0 if good else 1
