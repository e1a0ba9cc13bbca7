"""Our losses against the frameworks' own implementations, on the same inputs (values and gradients).

Runs only where the peers are installed (tests/requirements-peers.txt; every test here skips
without them, so the default suite does not need them):

* veRL (0.9.1): ``compute_policy_loss_vanilla`` / ``_gspo`` / ``_sapo`` / ``_cispo`` and ``agg_loss``
  versus the adapters registered by ``vespo_ext.integrations.verl``, for every aggregation mode,
  with and without rollout IS weights and data-parallel global counts.
* VESPO: veRL core has no VESPO, and the VESPO recipe's ``compute_policy_loss_vespo`` (github
  FloyedShen/VESPO, recipe/vespo/code/core_algos.py) is not installable, so ``vespo_fused`` is
  compared with docs/spec.md's math (tests/test_integrations.py: ``spec_per_token``) aggregated by
  veRL's own ``agg_loss``, and its weight phi with TRL's VESPO (``GRPOTrainer.get_gamma_weights``,
  an independent implementation of the same recipe).
* TRL (1.16.0): ``GRPOTrainer._compute_loss`` versus ``FusedGRPOTrainer._compute_loss`` on a
  trainer whose model forward is stubbed (the same per-token log-probs go into both), for every
  fused ``loss_type`` and the options they cover (epsilon_high, delta, sequence-level IS,
  beta with and without the KL bias correction, vLLM IS weights, off-policy / entropy masks,
  gradient accumulation, eval mode), comparing loss, gradient and the logged metrics.

Deliberate differences (each has a test that shows it on inputs where the two must differ, and
the comparisons above use inputs where both must agree):

1. TRL's VESPO (k, lambda) follows the sign of each advantage *entry*; ours the sign of the
   sequence's advantage (its first counted token, docs/spec.md: phi is a per-sequence coefficient).
   Equal for outcome advantages broadcast over a sequence (GRPO), different for per-token
   advantages whose sign changes inside a sequence. (SAPO's temperature follows each token's own
   advantage sign in ours as in veRL and TRL: test_sapo_per_token_advantage_sign_matches_verl.)
2. An all-masked batch: ours 0 with zero gradient; veRL's token-mean 0/0 = NaN.
3. veRL 0.9's ``seq-mean-token-sum-norm`` is a seq-mean divided by the horizon; the op's
   aggregation of that name (docs/spec.md, older veRL) divides the plain sum by the horizon. The veRL
   adapter passes the normaliser that reproduces the installed veRL.
4. The SAPO gate divides by ``tau + 1e-8`` in our op (veRL / TRL: ``tau``): 1e-8 relative.
5. ``actor/ppo_kl`` (ours) does not clamp the token log-ratio at ±20 (veRL does): metric only.
6. TRL's PPO clip and SAPO do not clamp the log-ratio at ±20 and its GSPO not at 10 (ours do);
   TRL's VESPO clamps log W at [log 1e-8, 20] (ours [-20, 20], then W >= 1e-8 in log phi): all
   equal unless a log-ratio leaves those ranges.
"""
from __future__ import annotations

import copy
import math
import subprocess
import sys
import types
import warnings
from contextlib import nullcontext

import pytest
import torch

from test_integrations import SAPO_FP64_RTOL, VERL_AGGS, assert_close, make_batch, spec_per_token

VERL_NAMES = {"grpo": "vanilla", "gspo": "gspo", "sapo": "sapo", "cispo": "cispo"}
# float64 agreement with veRL is ~1e-10, not 1e-15: with a bool mask veRL's seq-mean-token-mean
# divides by (int count + 1e-8), which PyTorch evaluates in float32, so the 1e-8 vanishes (ours: float64).
FP64_RTOL = 1e-8


# =============================================================================================
# veRL
@pytest.fixture(scope="module")
def verl():
    core = pytest.importorskip("verl.trainer.ppo.core_algos")
    from verl.workers.config import ActorConfig

    import vespo_ext.integrations.verl as V

    return types.SimpleNamespace(core=core, ActorConfig=ActorConfig, V=V)


def actor_config(verl, loss, **kw):
    base = dict(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2, clip_ratio_low=0.2,
                clip_ratio_high=0.28, clip_ratio_c=3.0)
    if loss == "gspo":
        base.update(clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    base.update(kw)
    info = base.pop("global_batch_info", None)
    cfg = verl.ActorConfig(**base)
    if info:
        cfg.global_batch_info.update(info)
    return cfg


def call(fn, batch, mode, cfg, dtype):
    b = {k: (v.to(dtype) if v.dtype.is_floating_point else v) for k, v in batch.items()}
    lp = b.pop("log_prob").detach().clone().requires_grad_(True)
    loss, metrics = fn(old_log_prob=b["old_log_prob"], log_prob=lp, advantages=b["advantages"],
                       response_mask=b["response_mask"], loss_agg_mode=mode, config=cfg,
                       rollout_is_weights=b.get("rollout_is_weights"))
    loss.backward()
    return loss.detach(), lp.grad, metrics


def test_verl_registry(verl):
    import inspect

    reg = verl.core.POLICY_LOSS_REGISTRY
    for name, loss in verl.V.LOSS_NAMES.items():
        assert verl.core.get_policy_loss_fn(name) is verl.V.policy_loss_fn(name)
        ours = inspect.signature(reg[name])
        theirs = inspect.signature(verl.core.compute_policy_loss_vanilla)
        assert list(ours.parameters) == list(theirs.parameters)
        assert [p.default for p in ours.parameters.values()] == [p.default for p in theirs.parameters.values()]
    assert "vanilla" in reg and reg["vanilla"] is verl.core.compute_policy_loss_vanilla  # nothing of veRL's replaced


def test_verl_external_modules_env():
    """VERL_USE_EXTERNAL_MODULES makes every veRL process (Ray workers too) register the losses."""
    pytest.importorskip("verl.trainer.ppo.core_algos")
    code = ("import verl\nfrom verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as R\n"
            "assert {'vespo_fused', 'grpo_fused', 'gspo_fused', 'sapo_fused', 'cispo_fused'} <= set(R), sorted(R)\n")
    env = dict(__import__("os").environ, VERL_USE_EXTERNAL_MODULES="vespo_ext.integrations.verl")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)


def _verl_ppo_loss(loss_mode, batch, P=3, **cfg_kw):
    """veRL's own actor loss (verl.workers.utils.losses.ppo_loss, which looks the PolicyLossFn up by
    config.policy_loss.loss_mode) on a no-padding model output built from a padded batch."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.config import ActorConfig, PolicyLossConfig
    from verl.workers.utils.losses import ppo_loss

    B, R = batch["log_prob"].shape
    r = batch["response_mask"].sum(-1)
    m = torch.arange(R).unsqueeze(0) < r.unsqueeze(1)
    att = torch.cat([torch.ones(B, P, dtype=torch.long), m.long()], 1)
    flat = torch.zeros(int(att.sum()))
    start = 0
    for i in range(B):  # veRL's log_probs are left-shifted by one token within each sequence
        n = int(r[i])
        flat[start + P - 1: start + P - 1 + n] = batch["log_prob"][i, :n].float()
        start += P + n
    flat.requires_grad_(True)
    data = TensorDict({"prompts": torch.zeros(B, P, dtype=torch.long), "responses": torch.zeros(B, R, dtype=torch.long),
                       "attention_mask": att, "response_mask": m, "old_log_probs": batch["old_log_prob"].float(),
                       "advantages": batch["advantages"].float()}, batch_size=B)
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(m.sum()), global_batch_size=B)
    cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                      policy_loss=PolicyLossConfig(loss_mode=loss_mode), **cfg_kw)
    loss, metrics = ppo_loss(cfg, {"log_probs": flat}, data)
    loss.backward()
    return loss.detach(), flat.grad, {k: v.aggregate() for k, v in metrics.items() if hasattr(v, "aggregate")}


@pytest.mark.parametrize("loss", ["grpo", "gspo", "sapo", "cispo", "vespo"])
def test_verl_ppo_loss_one_config_line(verl, loss):
    """The switch a veRL user makes: policy_loss.loss_mode=<name>_fused in veRL's real actor loss."""
    pytest.importorskip("PIL")  # verl.workers.utils.losses imports veRL's dataset module
    batch = make_batch(B=6, L=10, seed=21, empty_row=False)
    kw = dict(clip_ratio_low=3e-4, clip_ratio_high=4e-4) if loss == "gspo" else dict(clip_ratio_high=0.28)
    kw["loss_agg_mode"] = "seq-mean-token-mean" if loss == "gspo" else "token-mean"
    ours = _verl_ppo_loss(f"{loss}_fused", batch, **kw)
    if loss == "vespo":  # no veRL VESPO: SPEC's loss through the same veRL aggregation
        lp = batch["log_prob"].detach().clone().requires_grad_(True)
        per = spec_per_token("vespo", lp, batch["old_log_prob"], batch["advantages"], batch["response_mask"])
        assert_close(ours[0], verl.core.agg_loss(per, batch["response_mask"], "token-mean").detach(), 2e-5, "loss")
        assert "vespo/phi_mean" in ours[2]
        return
    theirs = _verl_ppo_loss(VERL_NAMES[loss], batch, **kw)
    assert_close(ours[0], theirs[0], 2e-5, "loss", atol=1e-7)
    assert_close(ours[1], theirs[1], 2e-5, "grad")
    for k, v in theirs[2].items():
        assert abs(ours[2][k] - v) <= 1e-6 + 1e-5 * abs(v), f"metric {k}: ours {ours[2][k]} vs veRL {v}"


@pytest.mark.parametrize("loss", ["grpo", "gspo", "sapo", "cispo"])
@pytest.mark.parametrize("mode", VERL_AGGS)
@pytest.mark.parametrize("tis", [False, True], ids=["no_tis", "tis"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_vs_verl(verl, loss, mode, tis, dtype):
    batch = make_batch(B=8, L=12, seed=11, spread=0.3, tis=tis)
    cfg = actor_config(verl, loss)
    ours = call(verl.V.policy_loss_fn(f"{loss}_fused"), batch, mode, cfg, dtype)
    theirs = call(getattr(verl.core, f"compute_policy_loss_{VERL_NAMES[loss]}"), batch, mode, cfg, torch.float64)
    tol = (SAPO_FP64_RTOL if loss == "sapo" else FP64_RTOL) if dtype == torch.float64 else 2e-5
    assert_close(ours[0], theirs[0], tol, "loss", atol=1e-7 if dtype == torch.float32 else 1e-12)
    assert_close(ours[1], theirs[1], tol, "grad")
    assert set(theirs[2]) <= set(ours[2])
    for k, v in theirs[2].items():
        assert isinstance(ours[2][k], float)
        assert abs(ours[2][k] - v) <= 1e-6 + 1e-5 * abs(v), f"metric {k}: ours {ours[2][k]} vs veRL {v}"


@pytest.mark.parametrize("loss", ["grpo", "gspo", "sapo", "cispo"])
@pytest.mark.parametrize("mode", VERL_AGGS)
def test_vs_verl_data_parallel(verl, loss, mode):
    """veRL's global_batch_info (set by its ppo_loss before calling the PolicyLossFn)."""
    batch = make_batch(B=8, L=12, seed=12, tis=True)
    info = {"dp_size": 4, "batch_num_tokens": torch.tensor(301), "global_batch_size": 29, "loss_scale_factor": 64}
    cfg = actor_config(verl, loss, global_batch_info=info, loss_scale_factor=64)
    ours = call(verl.V.policy_loss_fn(f"{loss}_fused"), batch, mode, cfg, torch.float64)
    theirs = call(getattr(verl.core, f"compute_policy_loss_{VERL_NAMES[loss]}"), batch, mode, cfg, torch.float64)
    tol = SAPO_FP64_RTOL if loss == "sapo" else FP64_RTOL
    assert_close(ours[0], theirs[0], tol, "loss")
    assert_close(ours[1], theirs[1], tol, "grad")


def test_vs_verl_dual_clip_and_extreme_ratios(verl):
    """Large off-policy drift: dual clip active, some |log-ratio| > 20 (both clamp at ±20)."""
    batch = make_batch(B=8, L=12, seed=13, spread=2.0)
    batch["old_log_prob"][0, :3] = batch["log_prob"][0, :3] - 25.0
    batch["old_log_prob"][1, :3] = batch["log_prob"][1, :3] + 21.0
    cfg = actor_config(verl, "grpo", clip_ratio_c=3.0)
    ours = call(verl.V.policy_loss_fn("grpo_fused"), batch, "token-mean", cfg, torch.float64)
    theirs = call(verl.core.compute_policy_loss_vanilla, batch, "token-mean", cfg, torch.float64)
    assert_close(ours[0], theirs[0], 1e-10, "loss")
    assert_close(ours[1], theirs[1], 1e-10, "grad")
    assert theirs[2]["actor/pg_clipfrac_lower"] > 0
    for k in ("actor/pg_clipfrac", "actor/pg_clipfrac_lower"):
        assert abs(ours[2][k] - theirs[2][k]) <= 1e-6  # veRL computes these fractions in float32
    # difference 5: ppo_kl is not clamped on our side
    assert abs(ours[2]["actor/ppo_kl"] - theirs[2]["actor/ppo_kl"]) > 1e-3


@pytest.mark.parametrize("mode", VERL_AGGS)
@pytest.mark.parametrize("tis", [False, True], ids=["no_tis", "tis"])
def test_vespo_vs_spec_with_verl_agg(verl, mode, tis):
    """No installable veRL VESPO: SPEC's per-token loss aggregated by veRL's agg_loss."""
    batch = make_batch(B=8, L=12, seed=14, spread=0.2, tis=tis)
    vespo = {"k_pos": 2.0, "lambda_pos": 3.0, "k_neg": 3.0, "lambda_neg": 2.0}
    cfg = actor_config(verl, "vespo")
    for dtype, tol in ((torch.float64, FP64_RTOL), (torch.float32, 2e-5)):
        ours = call(verl.V.policy_loss_fn("vespo_fused"), batch, mode, cfg, dtype)
        lp = batch["log_prob"].detach().clone().requires_grad_(True)
        per = spec_per_token("vespo", lp, batch["old_log_prob"], batch["advantages"], batch["response_mask"],
                             batch.get("rollout_is_weights"), **vespo)
        want = verl.core.agg_loss(per, batch["response_mask"], mode)
        want.backward()
        assert_close(ours[0], want.detach(), tol, "loss", atol=1e-7 if dtype == torch.float32 else 1e-12)
        assert_close(ours[1], lp.grad, tol, "grad")


def test_vespo_phi_vs_trl(verl):
    """phi(W) against TRL's independent VESPO implementation (GRPOTrainer.get_gamma_weights)."""
    trl_mod = pytest.importorskip("trl")
    batch = make_batch(B=8, L=12, seed=15, spread=0.3, tis=True)
    m = batch["response_mask"]
    adv = batch["advantages"][:, :1]
    w = torch.where(m, batch["rollout_is_weights"], torch.ones(()))  # TRL sums IS logs unmasked (ratio 1 there)
    phi_trl = trl_mod.GRPOTrainer.get_gamma_weights(adv, batch["log_prob"] - batch["old_log_prob"], m.double(), w)
    ours = call(verl.V.policy_loss_fn("vespo_fused"), batch, "seq-mean-token-sum", actor_config(verl, "vespo"),
                torch.float64)
    # seq-mean-token-sum: dloss/dlogp_t = -phi_i * A_i / n_seq, so phi_i = -grad * n_seq / A_i
    n_seq = float(m.any(-1).sum())
    rows = m.any(-1) & (adv.squeeze(1) != 0)
    phi_ours = (-ours[1][rows, 0] * n_seq / adv[rows, 0])
    assert_close(phi_ours, phi_trl[rows, 0], 1e-9, "phi")


def test_sapo_per_token_advantage_sign_matches_verl(verl):
    """Per-token advantages whose sign changes inside a sequence: tau per token, as veRL (issue #18)."""
    batch = make_batch(B=8, L=12, seed=16, adv="token", empty_row=False)
    cfg = actor_config(verl, "sapo", tau_pos=1.0, tau_neg=3.0)
    ours = call(verl.V.policy_loss_fn("sapo_fused"), batch, "token-mean", cfg, torch.float64)
    theirs = call(verl.core.compute_policy_loss_sapo, batch, "token-mean", cfg, torch.float64)
    assert_close(ours[0], theirs[0], SAPO_FP64_RTOL, "loss")
    lp = batch["log_prob"].detach().clone().requires_grad_(True)
    per = spec_per_token("sapo", lp, batch["old_log_prob"], batch["advantages"], batch["response_mask"],
                         tau_pos=1.0, tau_neg=3.0)
    want = verl.core.agg_loss(per, batch["response_mask"], "seq-mean-token-mean")
    assert_close(ours[0], want.detach(), SAPO_FP64_RTOL, "loss")


def test_difference_empty_batch(verl):
    """Difference 2: all-masked batch gives 0 (ours) vs NaN (veRL's token-mean)."""
    batch = make_batch(B=4, L=6, seed=17)
    batch["response_mask"] = torch.zeros_like(batch["response_mask"])
    cfg = actor_config(verl, "grpo")
    ours = call(verl.V.policy_loss_fn("grpo_fused"), batch, "token-mean", cfg, torch.float64)
    theirs = call(verl.core.compute_policy_loss_vanilla, batch, "token-mean", cfg, torch.float64)
    assert float(ours[0]) == 0.0 and bool((ours[1] == 0).all())
    assert math.isnan(float(theirs[0]))


def test_difference_seq_mean_token_sum_norm(verl):
    """Difference 3: the op's own "seq-mean-token-sum-norm" is veRL 0.9's times the number of sequences."""
    import vespo_ext

    batch = make_batch(B=8, L=12, seed=18)
    cfg = actor_config(verl, "grpo")
    theirs = call(verl.core.compute_policy_loss_vanilla, batch, "seq-mean-token-sum-norm", cfg, torch.float64)
    raw = vespo_ext.policy_loss_from_logp(batch["log_prob"], batch["old_log_prob"], batch["advantages"],
                                          batch["response_mask"], loss="grpo", agg="seq-mean-token-sum-norm",
                                          clip_ratio_low=0.2, clip_ratio_high=0.28)
    n_seq = float(batch["response_mask"].any(-1).sum())
    assert_close(raw, theirs[0] * n_seq, 1e-10, "raw op vs veRL * n_seq")


# =============================================================================================
# TRL
class _Acc:
    """A single-process accelerate.Accelerator stand-in (what _compute_loss touches)."""

    num_processes = 1

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x

    def autocast(self):
        return nullcontext()


@pytest.fixture(scope="module")
def trl_env():
    trl = pytest.importorskip("trl")
    from vespo_ext.integrations.trl import FusedGRPOTrainer, fused_plan

    args = trl.GRPOConfig(output_dir="/tmp/vespo-peers-grpo", report_to=[], use_cpu=True)
    return types.SimpleNamespace(trl=trl, GRPOTrainer=trl.GRPOTrainer, Fused=FusedGRPOTrainer, args=args,
                                 fused_plan=fused_plan)


def _trainer(env, cls, logps, entropies, *, training=True, ga=2, aux=None, **cfg):
    """A GRPOTrainer (or our subclass) without __init__: the attributes _compute_loss reads, set the way
    GRPOTrainer.__init__ sets them from a GRPOConfig, and a stubbed model forward."""
    from collections import defaultdict

    args = copy.copy(env.args)
    for k, v in cfg.items():
        setattr(args, k, v)
    t = object.__new__(cls)
    t.args = args
    t.loss_type = args.loss_type
    t.importance_sampling_level = args.importance_sampling_level
    t.off_policy_mask_threshold = args.off_policy_mask_threshold
    t.top_entropy_quantile = args.top_entropy_quantile
    t.epsilon_low = args.epsilon
    t.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    t.beta = args.beta
    t.use_vllm = cfg.get("use_vllm", False)
    t.vllm_importance_sampling_correction = cfg.get("vllm_importance_sampling_correction", False)
    t.max_completion_length = args.max_completion_length
    t.aux_loss_enabled = aux is not None
    t.router_aux_loss_coef = 0.01
    t._entropy_bonus_enabled = cfg.get("entropy_coef", 0.0) != 0.0
    t.entropy_coef = cfg.get("entropy_coef", 0.0)
    t.use_adaptive_entropy = False
    t.current_gradient_accumulation_steps = ga
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    t.accelerator = _Acc()
    t.model = types.SimpleNamespace(training=training)

    def fwd(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
            compute_aux_loss=False, **kwargs):
        return logps, entropies, aux

    t._get_per_token_logps_and_entropies = types.MethodType(fwd, t)
    return t


def _trl_inputs(B=6, T=10, seed=0, spread=0.3, adv_per_token=False):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).long()
    logp = -torch.rand(B, T, generator=g) * 3 - 0.05
    old = logp + spread * torch.randn(B, T, generator=g)
    a = torch.randn(B, generator=g)
    a[0], a[1], a[2] = abs(a[0]) + 0.2, -abs(a[1]) - 0.2, 0.0
    inputs = {
        "prompt_ids": torch.randint(0, 50, (B, 3), generator=g), "prompt_mask": torch.ones(B, 3, dtype=torch.long),
        "completion_ids": torch.randint(0, 50, (B, T), generator=g), "completion_mask": mask,
        "advantages": a if not adv_per_token else a.unsqueeze(1) + torch.randn(B, T, generator=g),
        "old_per_token_logps": old,
        "num_items_in_batch": mask.sum() * 2,  # the generation batch spans two micro-batches
        "ref_per_token_logps": logp + 0.1 * torch.randn(B, T, generator=g),
        "sampling_per_token_logps": old + 0.2 * torch.randn(B, T, generator=g),
        "importance_sampling_ratio": torch.exp(0.2 * torch.randn(B, T, generator=g)).clamp(max=2.0) ** mask,
    }
    entropies = torch.rand(B, T, generator=g) * 2
    return logp, entropies, inputs


def _run_trl(env, cls, logp, entropies, inputs, aux=None, **cfg):
    if not (cfg.get("use_vllm") and cfg.get("vllm_importance_sampling_correction")):
        inputs = {k: v for k, v in inputs.items() if k != "importance_sampling_ratio"}  # as TRL builds them
    lp = logp.detach().clone().requires_grad_(True)
    t = _trainer(env, cls, lp, entropies, aux=aux, **cfg)
    loss = t._compute_loss(None, inputs)
    loss.backward()
    mode = "train" if cfg.get("training", True) else "eval"
    return loss.detach(), lp.grad, {k: v[-1] for k, v in t._metrics[mode].items()}


TRL_CASES = {
    "grpo": dict(loss_type="grpo"),
    "grpo-dapo-eps": dict(loss_type="grpo", epsilon=0.2, epsilon_high=0.28),
    "bnpo": dict(loss_type="bnpo"),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "dapo": dict(loss_type="dapo", epsilon_high=0.28),
    "dapo-delta": dict(loss_type="dapo", epsilon_high=0.28, delta=1.5),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4),
    "gspo-dapo": dict(loss_type="dapo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4),
    "sapo": dict(loss_type="sapo"),
    "cispo": dict(loss_type="cispo", epsilon_high=1.1),
    "cispo-5": dict(loss_type="cispo", epsilon_high=5.0),
    "vespo": dict(loss_type="vespo"),
    "vespo-params": dict(loss_type="vespo", vespo_k_pos=1.0, vespo_lambda_pos=2.0, vespo_k_neg=4.0,
                         vespo_lambda_neg=1.5),
    "grpo-beta": dict(loss_type="grpo", beta=0.04),
    "dapo-beta-nobias": dict(loss_type="dapo", beta=0.04, use_bias_correction_kl=False),
    "vespo-beta": dict(loss_type="vespo", beta=0.04),
    "grpo-vllm-is": dict(loss_type="grpo", use_vllm=True, vllm_importance_sampling_correction=True),
    "vespo-vllm-is": dict(loss_type="vespo", use_vllm=True, vllm_importance_sampling_correction=True),
    "dapo-opsm": dict(loss_type="dapo", off_policy_mask_threshold=0.01),
    "grpo-entropy-mask": dict(loss_type="grpo", top_entropy_quantile=0.5),
    "sapo-eval": dict(loss_type="sapo", training=False),
    "dapo-eval": dict(loss_type="dapo", training=False),
}


@pytest.mark.parametrize("case", list(TRL_CASES))
def test_vs_trl(trl_env, case):
    cfg = dict(TRL_CASES[case])
    training = cfg.pop("training", True)
    logp, ent, inputs = _trl_inputs(seed=len(case), spread=0.6 if "gspo" not in case else 0.05)
    name, _, reason = trl_env.fused_plan(_trainer(trl_env, trl_env.Fused, logp, ent, **cfg))
    assert name is not None, reason
    theirs = _run_trl(trl_env, trl_env.GRPOTrainer, logp, ent, inputs, training=training, **cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fused path must not fall back
        ours = _run_trl(trl_env, trl_env.Fused, logp, ent, inputs, training=training, **cfg)
    tol = 2e-5
    assert_close(ours[0], theirs[0], tol, "loss", atol=1e-7)
    assert_close(ours[1], theirs[1], tol, "grad")
    assert set(ours[2]) == set(theirs[2])
    for k, v in theirs[2].items():
        assert abs(ours[2][k] - v) <= 1e-6 + 1e-5 * abs(v), f"metric {k}: ours {ours[2][k]} vs TRL {v}"


def test_vs_trl_aux_loss(trl_env):
    logp, ent, inputs = _trl_inputs(seed=3)
    aux = torch.tensor(0.7)
    theirs = _run_trl(trl_env, trl_env.GRPOTrainer, logp, ent, inputs, aux=aux, loss_type="dapo")
    ours = _run_trl(trl_env, trl_env.Fused, logp, ent, inputs, aux=aux, loss_type="dapo")
    assert_close(ours[0], theirs[0], 2e-5, "loss", atol=1e-7)
    assert_close(ours[1], theirs[1], 2e-5, "grad")
    assert ours[2]["aux_loss"] == theirs[2]["aux_loss"]


@pytest.mark.parametrize("cfg", [dict(loss_type="luspo", importance_sampling_level="sequence"),
                                 dict(loss_type="sapo", importance_sampling_level="sequence"),
                                 dict(loss_type="grpo", delta=1.1, epsilon_high=0.28),
                                 dict(loss_type="vespo", top_entropy_quantile=0.5),
                                 dict(loss_type="dapo", entropy_coef=0.01)],
                         ids=["luspo", "sapo-seq", "small-delta", "vespo-entropy-mask", "entropy-bonus"])
def test_trl_fallback(trl_env, cfg):
    """Configurations the fused path does not cover run TRL's own loss (identical result)."""
    import vespo_ext.integrations.trl as T

    logp, ent, inputs = _trl_inputs(seed=4)
    name, _, reason = trl_env.fused_plan(_trainer(trl_env, trl_env.Fused, logp, ent, **cfg))
    assert name is None and reason
    if cfg.get("entropy_coef"):
        pytest.skip("TRL's entropy bonus needs trainer state beyond this stub; the plan check above suffices")
    theirs = _run_trl(trl_env, trl_env.GRPOTrainer, logp, ent, inputs, **cfg)
    T.FusedGRPOMixin._fused_warned = False
    with pytest.warns(RuntimeWarning, match="TRL's own loss"):
        ours = _run_trl(trl_env, trl_env.Fused, logp, ent, inputs, **cfg)
    assert float(ours[0]) == float(theirs[0])
    assert torch.equal(ours[1], theirs[1])
    t = _trainer(trl_env, trl_env.Fused, logp.clone().requires_grad_(True), ent, **cfg)
    t.fused_loss_fallback = "error"
    with pytest.raises(NotImplementedError):
        t._compute_loss(None, inputs)


def test_trl_sapo_per_token_advantage_sign_matches(trl_env):
    """(B, T) advantages whose sign changes inside a sequence: SAPO's tau per token, as TRL."""
    logp, ent, inputs = _trl_inputs(seed=5, adv_per_token=True)
    cfg = dict(loss_type="sapo", sapo_temperature_neg=3.0)
    theirs = _run_trl(trl_env, trl_env.GRPOTrainer, logp, ent, inputs, **cfg)
    ours = _run_trl(trl_env, trl_env.Fused, logp, ent, inputs, **cfg)
    assert abs(float(ours[0]) - float(theirs[0])) <= 1e-5 * max(abs(float(theirs[0])), 1e-6), (ours[0], theirs[0])


def test_trl_logp_signature(trl_env):
    """The multimodal inputs our _compute_loss forwards by name are those TRL 1.16 forwards."""
    import inspect

    from vespo_ext.integrations.trl import _LOGP_ARGS

    params = inspect.signature(trl_env.GRPOTrainer._get_per_token_logps_and_entropies).parameters
    forwarded = {n for n, p in params.items() if n not in _LOGP_ARGS and p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                                                   p.KEYWORD_ONLY)}
    assert forwarded == {"pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                         "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids"}


def test_trl_trainer_class(trl_env):
    assert issubclass(trl_env.Fused, trl_env.GRPOTrainer)
    assert trl_env.Fused._compute_loss is not trl_env.GRPOTrainer._compute_loss
    assert trl_env.Fused.__mro__[1].__name__ == "FusedGRPOMixin"
