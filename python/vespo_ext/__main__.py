"""`python -m vespo_ext`: version, compiled kernels, GPU, torch/CuPy, and a self-check (vespo_ext._doctor)."""
import sys

from vespo_ext._doctor import main

sys.exit(main(sys.argv[1:]))
