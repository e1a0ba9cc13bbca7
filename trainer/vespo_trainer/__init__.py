"""vespo_trainer: off-policy RL training with the fused VESPO loss (Ray + DeepSpeed). CLI: `vespo`.

The package map is drawn in README's "Development" section; docs/spec.md states the math it implements.
"""
from vespo_ext import __version__  # the one version string (vespo_ext is torch-free to import)

__all__ = ["__version__"]
