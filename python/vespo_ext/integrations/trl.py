"""TRL integration: a GRPOTrainer whose policy loss runs on the fused op.

One line for a TRL user::

    from vespo_ext.integrations.trl import FusedGRPOTrainer as GRPOTrainer

or, for a trainer that already subclasses GRPOTrainer, put ``FusedGRPOMixin`` first in its bases::

    class MyTrainer(FusedGRPOMixin, MyGRPOTrainerSubclass): ...

Everything else stays TRL's: ``GRPOConfig`` (``loss_type``, ``epsilon``, ``epsilon_high``,
``delta``, ``beta``, ``importance_sampling_level``, ``sapo_temperature_*``, ``vespo_*``, vLLM
importance-sampling correction, ...), generation, rewards, advantages and logging.

What it replaces: the body of ``GRPOTrainer._compute_loss`` after the policy's per-token
log-probs are computed (TRL's ``_get_per_token_logps_and_entropies``, unchanged) — the
importance ratios, the per-``loss_type`` per-token loss, the masks and importance weights
applied to it and its aggregation — by one call to ``vespo_ext.policy_loss_from_logp`` with the
loss, the clip/temperature/VESPO parameters, the aggregation and the normaliser that reproduce
TRL's ``loss_type``:

===================================== =============== =========================================
TRL ``loss_type``                     fused loss      aggregation (norm)
===================================== =============== =========================================
grpo, bnpo, dr_grpo, dapo (token IS)  grpo            as TRL (see ``_fused_aggregation``)
the same with importance_sampling_    gspo            as TRL
level="sequence" (GSPO)
sapo                                  sapo            seq-mean over the micro-batch's rows
cispo                                 cispo           token sum / TRL's num_items normaliser
vespo                                 vespo           token sum / TRL's num_items normaliser
===================================== =============== =========================================

TRL's PPO clip has no dual clip; ``delta`` (two-sided clip) is the dual clip with c = delta
(exactly equal when delta >= 1 + epsilon_high, which TRL recommends). TRL's CISPO clips the ratio
at ``epsilon_high`` from above only (an absolute cap, e.g. 5.0), mapped to the fused CISPO with
bounds [0, epsilon_high]. The KL term (``beta != 0``, with or without
``use_bias_correction_kl``), the MoE aux loss and TRL's metrics (entropy, kl, clip ratios,
cispo_clip_ratio, vespo/phi_seq_mean) are computed as TRL does.

Configurations the fused path does not cover fall back to TRL's own ``_compute_loss`` (with a
one-time warning naming the reason; set ``fused_loss_fallback = "error"`` on the trainer to raise
instead): ``loss_type="luspo"``; sapo / cispo with ``importance_sampling_level="sequence"``;
``delta`` together with sequence-level IS, or ``delta < 1 + epsilon_high``; VESPO with
``top_entropy_quantile < 1`` or ``off_policy_mask_threshold`` (TRL computes VESPO's weight over
the full mask and zeroes the loss afterwards); the entropy bonus (``entropy_coef != 0`` or
adaptive entropy).

Deliberate differences (tests/test_peers.py checks them on inputs where both must agree):
TRL picks SAPO's temperature and VESPO's (k, λ) by the sign of each advantage entry; the fused op
by the sequence's (first counted token's) advantage: equal for TRL's (B,) advantages. The fused
GRPO / SAPO clamp the token log-ratio at ±20 and GSPO's exponent at 10 (TRL: no clamp); TRL's
VESPO sums the vLLM IS log-ratio over every position, the fused op over counted ones (TRL's ratio
is exactly 1 at uncounted positions in its token modes, so they agree).

Fused linear (``fused_linear = "auto" | "true" | "false"`` on the trainer; auto: a plain Linear head and
V >= 8192): the per-token log-probs and entropies come from the backbone's last hidden states and
``lm_head.weight`` through ``vespo_ext.linear_token_logprobs``, never a (B, T, V) logits tensor
(multimodal inputs and the MoE aux loss keep TRL's forward).

Tested against TRL 1.16.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Optional

import torch

from .. import linear, ops

try:
    from trl import GRPOTrainer as _GRPOTrainer
except ModuleNotFoundError as _e:  # only TRL itself missing is an ImportError with a hint
    if _e.name and _e.name.split(".")[0] == "trl":
        raise ImportError("vespo_ext.integrations.trl needs TRL (pip install trl)") from _e
    raise

__all__ = ["FusedGRPOMixin", "FusedGRPOTrainer", "fused_plan"]

_PPO_FAMILY = ("grpo", "bnpo", "dr_grpo", "dapo")
_NO_DUAL_CLIP = 1e30  # clip_ratio_c that never binds: TRL's PPO clip has no dual clip
_LOGP_ARGS = {"self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
              "compute_aux_loss"}


def fused_plan(trainer) -> tuple[Optional[str], dict, str]:
    """(fused loss name or None, its parameters, reason when None) for a GRPOTrainer's configuration."""
    args = trainer.args
    lt, level = trainer.loss_type, trainer.importance_sampling_level
    eps_low, eps_high = float(trainer.epsilon_low), float(trainer.epsilon_high)
    delta = getattr(args, "delta", None)
    if getattr(trainer, "_entropy_bonus_enabled", False):
        return None, {}, "the entropy bonus (entropy_coef / adaptive entropy) is not fused"
    if lt == "vespo":
        if trainer.top_entropy_quantile < 1.0 or trainer.off_policy_mask_threshold is not None:
            return None, {}, "VESPO with top_entropy_quantile < 1 or off_policy_mask_threshold is not fused"
        return "vespo", {"k_pos": args.vespo_k_pos, "lambda_pos": args.vespo_lambda_pos,
                         "k_neg": args.vespo_k_neg, "lambda_neg": args.vespo_lambda_neg}, ""
    if lt in _PPO_FAMILY:
        if level == "sequence":
            if delta is not None:
                return None, {}, "delta with importance_sampling_level='sequence' is not fused"
            return "gspo", {"clip_ratio_low": eps_low, "clip_ratio_high": eps_high}, ""
        if delta is not None and not delta >= 1.0 + eps_high:
            return None, {}, f"delta={delta} < 1 + epsilon_high is not the dual clip"
        return "grpo", {"clip_ratio_low": eps_low, "clip_ratio_high": eps_high,
                        "clip_ratio_c": _NO_DUAL_CLIP if delta is None else float(delta)}, ""
    if lt in ("sapo", "cispo"):
        if level != "token":
            return None, {}, f"{lt} with importance_sampling_level={level!r} is not fused"
        if lt == "sapo":
            return "sapo", {"tau_pos": args.sapo_temperature_pos, "tau_neg": args.sapo_temperature_neg}, ""
        if eps_high < 0:
            return None, {}, f"cispo with epsilon_high={eps_high} < 0"
        # TRL: sg(min(r, epsilon_high)); fused: sg(clamp(r, 1 - lo, 1 + hi)) with 1 - lo = 0 (r > 0 anyway)
        return "cispo", {"clip_ratio_low": 1.0, "clip_ratio_high": eps_high - 1.0}, ""
    return None, {}, f"loss_type={lt!r} is not fused"


class FusedGRPOMixin:
    """Overrides ``_compute_loss`` of a TRL GRPOTrainer (see the module docstring)."""

    fused_loss_fallback = "warn"  # "warn" (once), "silent" or "error"
    _fused_warned = False

    # -------------------------------------------------------------------------------------------
    def _fused_mode(self) -> str:
        return "train" if self.model.training else "eval"

    def _fused_aggregation(self, mask, inputs, mode):
        """(agg, norm) for the fused op that reproduce TRL's aggregation of loss_type."""
        lt = self.loss_type
        ga = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        B = mask.shape[0]
        if lt in ("grpo", "sapo"):  # mean over the rows of the per-row token mean
            return "seq-mean-token-mean", float(B * ga)
        if lt == "bnpo":
            return "token-mean", mask.sum().clamp(min=1.0).to(torch.float32) * ga
        if lt == "dr_grpo":
            return "token-mean", float(B * self.max_completion_length * ga)
        # cispo, dapo, vespo: `num_items_in_batch` spans the generation batch
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return "token-mean", normalizer.to(device=mask.device, dtype=torch.float32)

    def _fused_aggregate_torch(self, x, mask, inputs, mode):
        """TRL's aggregation in plain torch (for the KL term, which is not part of the fused loss)."""
        lt = self.loss_type
        ga = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if lt in ("grpo", "sapo"):
            return ((x * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / ga
        if lt == "bnpo":
            return (x * mask).sum() / mask.sum().clamp(min=1.0) / ga
        if lt == "dr_grpo":
            return (x * mask).sum() / (x.size(0) * self.max_completion_length) / ga
        _, norm = self._fused_aggregation(mask, inputs, mode)
        return (x * mask).sum() / norm

    def _fused_fallback(self, model, inputs, reason: str):
        policy = getattr(self, "fused_loss_fallback", "warn")
        if policy == "error":
            raise NotImplementedError(f"vespo_ext FusedGRPOTrainer: {reason}")
        if policy == "warn" and not FusedGRPOMixin._fused_warned:
            FusedGRPOMixin._fused_warned = True
            warnings.warn(f"vespo_ext FusedGRPOTrainer: {reason}; using TRL's own loss", RuntimeWarning, stacklevel=3)
        return super()._compute_loss(model, inputs)

    # -------------------------------------------------------------------------------------------
    fused_linear = "auto"  # "auto" (plain Linear head, V >= 8192), "true", "false": see _fused_linear_logps

    def _fused_linear_logps(self, model, input_ids, attention_mask, logits_to_keep, extra):
        """TRL's per-token log-probs and entropies from the backbone's last hidden states and the head's
        weight (vespo_ext.linear_token_logprobs: no (B, T, V) logits), or None for TRL's own forward:
        fused_linear "false", a model whose logits are not lm_head(hidden) (integrations.hf.linear_head),
        a DDP / FSDP-wrapped or ZeRO-3 model (hf.needs_wrapped_forward), multimodal inputs, or the MoE aux
        loss. Same values as TRL's (logits / temperature, log-softmax at the completion tokens, entropy),
        differentiable in every parameter."""
        from . import hf

        if str(getattr(self, "fused_linear", "auto")).lower() == "false" or self.aux_loss_enabled or \
                any(v is not None for v in extra.values()):
            return None
        unwrap = getattr(getattr(self, "accelerator", None), "unwrap_model", None)
        unwrapped = unwrap(model) if callable(unwrap) else model
        if not hf.use_fused_linear(getattr(self, "fused_linear", "auto"), unwrapped):
            return None
        if hf.needs_wrapped_forward(model, unwrapped):  # DDP / FSDP / ZeRO-3: the backward needs their forward
            return None
        backbone, head = hf.linear_head(unwrapped)
        out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state[:, -logits_to_keep - 1:-1]
        logp, entropy = linear.linear_token_logprobs(
            hidden, head.weight, input_ids[:, -logits_to_keep:], bias=head.bias, temperature=self.temperature,
            return_entropy=True)
        return logp, entropy.detach(), None

    def _compute_loss(self, model, inputs):
        loss_name, params, reason = fused_plan(self)
        if loss_name is None:
            return self._fused_fallback(model, inputs, reason)

        # The policy's per-token log-probs, exactly as TRL computes them.
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        sig = inspect.signature(self._get_per_token_logps_and_entropies).parameters.values()
        extra = {p.name: inputs.get(p.name) for p in sig  # TRL passes these multimodal inputs by name
                 if p.name not in _LOGP_ARGS and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        fused = self._fused_linear_logps(model, input_ids, attention_mask, logits_to_keep, extra)
        if fused is not None:
            per_token_logps, entropies, aux_loss = fused
        else:
            per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, compute_entropy=True,
                compute_aux_loss=self.aux_loss_enabled, **extra)

        entropy_mask = (self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
                        if self.top_entropy_quantile < 1.0 else None)
        advantages = inputs["advantages"]  # (B,) or (B, T); the fused op takes either
        adv2 = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        old = inputs.get("old_per_token_logps")
        old = per_token_logps.detach() if old is None else old

        # Multiplicative per-token factors TRL applies to the per-token loss: they are the op's
        # rollout_is_weights for every loss but VESPO (which folds the IS ratio into its weight W).
        factors = []
        if self.off_policy_mask_threshold is not None:
            sampling = inputs.get("sampling_per_token_logps", old)
            factors.append(self.get_off_policy_mask(adv2, per_token_logps, sampling, mask,
                                                    self.off_policy_mask_threshold))
        if entropy_mask is not None:
            factors.append(entropy_mask)
        # vLLM importance-sampling ratio: TRL multiplies it into the loss when the correction is on, and
        # its VESPO folds whatever the inputs carry into W (present exactly when the correction is on).
        is_ratio = None
        if loss_name == "vespo":
            is_ratio = inputs.get("importance_sampling_ratio")
        elif self.use_vllm and self.vllm_importance_sampling_correction:
            is_ratio = inputs["importance_sampling_ratio"]
            factors.append(is_ratio)
        weights = None
        if loss_name != "vespo" and factors:
            weights = torch.ones_like(per_token_logps, dtype=torch.float32)
            for f in factors:
                weights = weights * f.detach().to(torch.float32)
        elif is_ratio is not None:  # VESPO
            weights = is_ratio.detach().to(torch.float32).expand_as(per_token_logps)

        mode = self._fused_mode()
        agg, norm = self._fused_aggregation(mask, inputs, mode)
        loss, fused_metrics = ops.policy_loss_from_logp(per_token_logps, old, advantages, mask, loss=loss_name,
                                                        rollout_is_weights=weights, agg=agg, norm=norm,
                                                        return_metrics=True, **params)

        log_ratio = per_token_logps - old
        if self.importance_sampling_level == "sequence":
            log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        else:
            log_w = log_ratio
        coef_1 = torch.exp(log_w)  # only for the KL bias correction (differentiable) and the metrics

        per_token_kl = None
        if self.beta != 0.0:
            ref = inputs["ref_per_token_logps"]
            per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
            if self.args.use_bias_correction_kl:
                per_token_kl = per_token_kl * coef_1
            loss = loss + self.beta * self._fused_aggregate_torch(per_token_kl, mask, inputs, mode)

        if self.aux_loss_enabled:
            ga = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / ga
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        self._fused_log_metrics(mode, mask, entropies, per_token_kl, coef_1.detach(), adv2, fused_metrics)
        return loss

    # -------------------------------------------------------------------------------------------
    def _fused_log_metrics(self, mode, mask, entropies, per_token_kl, coef_1, advantages, fused_metrics):
        from trl.trainer.utils import nanmax, nanmin

        with torch.no_grad():
            def masked_seq_mean(x):
                if x.shape[1] == 1:
                    return x.squeeze(1)
                return (x * mask).sum(-1) / mask.sum(-1)

            def global_masked_mean(x):
                if x.shape[1] == 1:
                    local_sum, local_count = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
                else:
                    local_sum, local_count = (x * mask).sum(), mask.sum().float()
                totals = self.accelerator.reduce(torch.stack([local_sum, local_count]), reduction="sum")
                return (totals[0] / totals[1].clamp(min=1.0)).item()

            if per_token_kl is not None:
                self._metrics[mode]["kl"].append(global_masked_mean(per_token_kl))
            self._metrics[mode]["entropy"].append(global_masked_mean(entropies))
            lt = self.loss_type
            if lt in _PPO_FAMILY:
                low = (coef_1 < 1 - self.epsilon_low) & (advantages < 0)
                high = (coef_1 > 1 + self.epsilon_high) & (advantages > 0)
                region = low | high
                self._metrics[mode]["clip_ratio/low_mean"].append(global_masked_mean(low.float()))
                self._metrics[mode]["clip_ratio/high_mean"].append(global_masked_mean(high.float()))
                self._metrics[mode]["clip_ratio/region_mean"].append(global_masked_mean(region.float()))
                self._metrics[mode]["clip_ratio/low_min"].append(
                    nanmin(self.accelerator.gather(masked_seq_mean(low.float()))).item())
                self._metrics[mode]["clip_ratio/high_max"].append(
                    nanmax(self.accelerator.gather(masked_seq_mean(high.float()))).item())
            elif lt == "cispo":
                clipped = (coef_1 > self.epsilon_high) & (advantages > 0)
                self._metrics[mode]["cispo_clip_ratio"].append(global_masked_mean(clipped.float()))
            elif lt == "vespo":
                # TRL's mean of phi over the rows, from the op's metrics (mean over non-empty rows, count)
                m = fused_metrics
                totals = self.accelerator.reduce(torch.stack([m["phi_mean"] * m["n_seq"], m["n_seq"]]).float(),
                                                 reduction="sum")
                self._metrics[mode]["vespo/phi_seq_mean"].append((totals[0] / totals[1].clamp(min=1.0)).item())


class FusedGRPOTrainer(FusedGRPOMixin, _GRPOTrainer):
    """TRL's GRPOTrainer with the policy loss on vespo_ext's fused op (drop-in; same GRPOConfig)."""
