"""vespo_trainer: off-policy RL training with the fused VESPO loss (Ray + DeepSpeed). CLI: `vespo`."""
__version__ = "0.1.0"
