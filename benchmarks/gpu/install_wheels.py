"""Pick the carried wheels (benchmarks/wheels/*.whl) this interpreter needs: a wheel whose distribution is
not installed, or installed at a lower version. Prints their paths, one a line (run_gpu.sh installs them
with pip --no-index --no-deps --target). Nothing is installed here; standard library + packaging only."""
from __future__ import annotations

import glob
import os
import sys
from importlib import metadata


def needed(wheel_dir: str):
    try:
        from packaging.version import Version
    except ImportError:  # pip vendors it
        from pip._vendor.packaging.version import Version
    for path in sorted(glob.glob(os.path.join(wheel_dir, "*.whl"))):
        name, version = os.path.basename(path).split("-")[:2]
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        if have is None or Version(have) < Version(version):
            print(f"  {name} {version}: installing (here: {have or 'absent'})", file=sys.stderr)
            yield path
        else:
            print(f"  {name} {version}: skipped (here: {have})", file=sys.stderr)


if __name__ == "__main__":
    for p in needed(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/wheels"):
        print(p)
