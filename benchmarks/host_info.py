"""What both CPU/GPU benchmark scripts record about the machine they ran on, and the process-memory reader
both use (imported by them as a sibling module: they run as `python benchmarks/<script>.py`)."""
from __future__ import annotations

import os
import platform
import subprocess


def host_info(torch_version: str, threads: int) -> dict:
    """torch/python versions, CPU model, thread count, the checkout's git HEAD and the load average at
    the start (other work on a shared machine skews CPU timings: keep the load next to the numbers)."""
    info = {"torch": torch_version, "python": platform.python_version(), "os_cpus": os.cpu_count(),
            "threads": threads}
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        info["git"] = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git"] = None
    try:  # what the installed extension was built with (a pip-built install; none for copied modules)
        from vespo_ext import _build_info as b

        info["build"] = {k: getattr(b, k, None) for k in ("cuda_architectures", "cuda_fwd_exp", "cuda_compiler")}
    except ImportError:
        pass
    try:  # the CPU kernels' code path on this machine (avx512 / avx2 / generic; VESPO_CPU_ISA caps it)
        from vespo_ext import _core

        info["cpu_isa"] = _core.cpu_isa()
    except (ImportError, ValueError):
        pass
    try:
        with open("/proc/loadavg") as f:
            info["loadavg_start"] = f.read().split()[:3]
    except OSError:
        pass
    return info


def status_kb(field: str) -> int:
    """A kB field of /proc/self/status (VmRSS, VmHWM): the benchmarks' CPU memory measurements."""
    with open("/proc/self/status") as f:
        for ln in f:
            if ln.startswith(field + ":"):
                return int(ln.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")
