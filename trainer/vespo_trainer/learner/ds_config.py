"""The DeepSpeed config of a learner rank (AdamW, ZeRO stage, clipping, micro-batch and accumulation)."""
from __future__ import annotations


def deepspeed_config(cfg, micro: int, gas: int, on_cuda: bool) -> dict:
    a = cfg.actor
    zero = {"stage": a.zero_stage}
    if a.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = a.zero3_persist_numel
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "optimizer": {"type": "AdamW", "params": {"lr": a.lr, "betas": list(a.betas), "eps": 1e-8,
                                                  "weight_decay": a.weight_decay, "torch_adam": True}},
        "gradient_clipping": a.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False}, "fp16": {"enabled": False},
        "steps_per_print": 2**62, "wall_clock_breakdown": False,
    }
