"""Hugging Face causal LMs: the policy loss from the backbone's last hidden states and the head's weight
(vespo_ext.linear_policy_loss), never `model(...).logits`.

    from vespo_ext.integrations import hf
    head = hf.linear_head(model)                 # None when the logits are not exactly lm_head(hidden)
    if head is not None and hf.use_fused_linear("auto", model):
        loss = hf.response_policy_loss(model, input_ids, attention_mask, responses, old_logp, advantages,
                                       response_mask, position_ids=position_ids, loss="vespo")

`response_policy_loss` computes what
`vespo_ext.policy_loss(model(input_ids, ...).logits[:, -L-1:-1], responses, ...)` computes (the last L
positions predict the L response tokens), with the same gradients to every parameter (tied input
embeddings included: autograd accumulates the head's and the embedding's gradients).
"""
from __future__ import annotations

from typing import Optional

import torch

# Config attributes that change the logits after the head (Gemma-2 soft-capping, Cohere/Granite scaling):
# models with any of them set (scales: other than 1) take the unfused path.
_LOGIT_CAPS = ("final_logit_softcapping",)
_LOGIT_SCALES = ("logit_scale", "logits_scaling")
FUSED_LINEAR_MIN_VOCAB = 8192  # actor.fused_linear=auto: on from this vocabulary size


def linear_head(model) -> Optional[tuple]:
    """(backbone, head) of a *ForCausalLM whose logits are head(backbone(...).last_hidden_state) with head
    an nn.Linear; None for anything else (soft-capped or scaled logits, non-Linear heads, no backbone)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, torch.nn.Linear):
        return None
    cfg = getattr(model, "config", None)
    if any(getattr(cfg, a, None) is not None for a in _LOGIT_CAPS) or \
            any(getattr(cfg, a, None) not in (None, 1, 1.0) for a in _LOGIT_SCALES):
        return None
    backbone = getattr(model, getattr(model, "base_model_prefix", "model") or "model", None)
    if not isinstance(backbone, torch.nn.Module) or backbone is model:
        return None
    return backbone, head


def use_fused_linear(setting, model) -> bool:
    """actor.fused_linear: "auto" (on when the head is a plain Linear and V >= 8192), True/"true", False/"false".
    True on a model without a plain linear head is a ValueError."""
    s = str(setting).lower()
    if s not in ("auto", "true", "false"):
        raise ValueError(f"fused_linear must be auto, true or false, got {setting!r}")
    if s == "false":
        return False
    head = linear_head(model)
    if s == "true":
        if head is None:
            raise ValueError(f"fused_linear=true, but {type(model).__name__} has no plain nn.Linear head whose output "
                             "is the logits (soft-capped/scaled logits or a custom head): use auto or false")
        return True
    return head is not None and head[1].weight.shape[0] >= FUSED_LINEAR_MIN_VOCAB


def _wrapper_types() -> tuple:
    kinds = [torch.nn.parallel.DistributedDataParallel]
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        kinds.append(FullyShardedDataParallel)
    except ImportError:  # a torch without distributed
        pass
    try:
        from torch.distributed.fsdp import FSDPModule  # FSDP2 (fully_shard): the module itself is an instance
        kinds.append(FSDPModule)
    except ImportError:
        pass
    return tuple(kinds)


def needs_wrapped_forward(model, unwrapped=None) -> bool:
    """Whether the fused path, which calls the backbone and reads the head's weight directly, would skip work
    that `model`'s own forward does for the backward: DistributedDataParallel arms its gradient all-reduce in
    forward (Reducer::prepare_for_backward; without it autograd_hook returns early, "if
    (!expect_autograd_hooks_) return", and every rank trains its own replica), FSDP unshards the parameters
    in forward, and a DeepSpeed ZeRO-3 parameter is a partitioned placeholder outside its module's forward.
    Such a model must take its own logits forward."""
    mods = [m for m in (model, unwrapped) if m is not None]
    kinds = _wrapper_types()
    if any(isinstance(m, kinds) for m in mods):
        return True
    head = linear_head(mods[-1])
    return head is not None and any(hasattr(p, "ds_id") for p in head[1].parameters())


def response_hidden(model, input_ids, attention_mask=None, L: int = 1, position_ids=None) -> torch.Tensor:
    """(B, L, H) last hidden states at the positions that predict the last L tokens of `input_ids`."""
    backbone, _ = linear_head(model)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden[:, -L - 1:-1]


def response_policy_loss(model, input_ids, attention_mask, responses, old_logp, advantages, response_mask, *,
                         position_ids=None, chunk_tokens=None, **kwargs):
    """vespo_ext.linear_policy_loss on the hidden states that predict `responses` (B, L) (the last L tokens
    of `input_ids`); kwargs (loss, agg, norm, temperature, rollout_is_weights, return_metrics, loss
    parameters) as for `policy_loss`."""
    import vespo_ext

    L = responses.shape[1]
    hidden = response_hidden(model, input_ids, attention_mask, L, position_ids)
    _, head = linear_head(model)
    return vespo_ext.linear_policy_loss(hidden, head.weight, responses, old_logp, advantages, response_mask,
                                        bias=head.bias, chunk_tokens=chunk_tokens, **kwargs)
