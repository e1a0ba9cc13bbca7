#!/usr/bin/env bash
# Fill benchmarks/wheels/ (git-ignored) with the pure-Python packages run_gpu.sh needs and the GPU image
# lacks, on the development machine (the GPU machine has no network). About 6 MB; carry it:
#   run(command="bash benchmarks/run_gpu.sh", carry=["benchmarks/wheels"])
#
#   liger-kernel            the GPU baseline of bench_vespo_loss / bench_linear_loss
#   deepspeed               the learner of trainer_gpu_check.py; PyPI has only its sdist, so it is built
#                           here into a py3-none-any wheel (DS_BUILD_OPS=0: no compiled ops, JIT on use;
#                           the learner uses torch's AdamW, nothing is compiled); needs torch installed here
#   hjson, pydantic, pydantic-core (cp312 binary), annotated-types, typing-inspection, typing-extensions
#                           what `import deepspeed` needs beyond the image (einops, msgpack, psutil,
#                           py-cpuinfo, ninja, tqdm, nvidia-ml-py are there: .library/device/KINDS.md)
#   omegaconf               vespo_trainer.config (needs PyYAML, which the image has)
# run_gpu.sh installs a carried wheel only where the image lacks that package or has an older version
# (benchmarks/gpu/install_wheels.py). Versions: those of the development venv (2026-12).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
D=benchmarks/wheels
mkdir -p "$D"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$D" \
  liger-kernel==0.8.5 hjson==3.1.0 omegaconf==2.4.0 pydantic==2.14.4 pydantic-core==2.50.5 \
  annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
if ! ls "$D"/deepspeed-*.whl >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  $PY -m pip download -q --no-deps --no-binary=:all: -d "$tmp" deepspeed==0.19.8
  DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w "$D" "$tmp"/deepspeed-*.tar.gz
  rm -rf "$tmp"
fi
ls -l "$D"
du -sh "$D"
