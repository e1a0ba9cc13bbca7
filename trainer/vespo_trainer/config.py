"""The run configuration: OmegaConf structured dataclasses with help text, loading, overrides, validation.

    cfg = load_config("examples/configs/arith_tiny.yaml", ["trainer.total_steps=4", "algorithm.loss=grpo"])

Every field carries its help text (`vespo train --print-config` shows them). Checks on one field
live in that group's __post_init__, checks across groups in Config.__post_init__; OmegaConf's
`to_object` runs them, so an impossible setting fails before anything starts, with a ConfigError
that says which key is wrong and why.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

LOSSES = ("vespo", "grpo", "gspo", "sapo", "cispo")  # vespo_ext.LOSSES (checked against it in validation)
AGGS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


class ConfigError(ValueError):
    """An impossible or unsupported setting; the message names the key."""


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def _one_of(value, key: str, choices) -> None:
    _check(value in choices, key, f"must be one of {', '.join(map(str, choices))}; got {value!r}")


@dataclass
class TrainerConfig:
    total_steps: int = _f(1000, "rollout steps (each: generate, score, N optimizer steps, weight sync)")
    output_dir: Optional[str] = _f(None, "run directory; default runs/<experiment_name>-<time>")
    experiment_name: str = _f("arith", "name used in the default output_dir")
    seed: int = _f(0, "seed of the model init, data order and sampling (all derived from it)")
    resume: bool = _f(False, "continue from the latest checkpoint in output_dir (same data order and RNG)")
    mode: str = _f("sync", "sync: staleness N = data.train_batch_size / actor.ppo_mini_batch_size "
                           "(async arrives in a later release)")
    save_every: int = _f(100, "save a checkpoint every this many steps (0: only at the end); always at the end")
    keep_checkpoints: int = _f(2, "keep this many most recent checkpoints (0: keep all)")
    num_threads: int = _f(0, "torch threads per actor (0: the CPUs Ray gives the actor, at least 1)")
    device: str = _f("auto", "auto (cuda when a GPU is visible), cpu or cuda")
    progress: str = _f("auto", "auto (rich bar on a TTY, plain lines otherwise), rich, plain or none")
    log_every: int = _f(10, "plain progress: print a line every this many steps")
    tensorboard: bool = _f(True, "write TensorBoard event files under output_dir/tensorboard")
    provenance: bool = _f(True, "write provenance.jsonl: per-sample id, prompt id, versions and trained lag")

    def __post_init__(self):
        _check(self.total_steps >= 1, "trainer.total_steps", f"must be >= 1; got {self.total_steps}")
        _check(self.mode != "async", "trainer.mode",
               "'async' is not implemented yet; this release trains in 'sync' mode")
        _one_of(self.mode, "trainer.mode", ("sync",))
        _check(self.save_every >= 0, "trainer.save_every", "must be >= 0")
        _check(self.keep_checkpoints >= 0, "trainer.keep_checkpoints", "must be >= 0")
        _check(self.num_threads >= 0, "trainer.num_threads", "must be >= 0")
        _one_of(self.device, "trainer.device", ("auto", "cpu", "cuda"))
        _one_of(self.progress, "trainer.progress", ("auto", "rich", "plain", "none"))
        _check(self.log_every >= 1, "trainer.log_every", "must be >= 1")


@dataclass
class TaskConfig:
    name: str = _f("arith", "built-in task: arith ('a+b=' -> last digit of a+b, then EOS; reward 1 if exact)")
    a_max: int = _f(9, "the first operand a takes the values 0..a_max")
    b_max: int = _f(9, "the second operand b takes the values 0..b_max (smaller: an easier table)")
    warmup_steps: int = _f(40, "supervised warm-up steps on the answer FORMAT only (a random digit then EOS), "
                               "so a random policy already scores ~0.1; 0 disables")
    warmup_batch_size: int = _f(64, "sequences per warm-up step")
    warmup_lr: float = _f(3e-3, "learning rate of the warm-up steps (the RL steps use actor.lr)")

    def __post_init__(self):
        _one_of(self.name, "task.name", ("arith",))
        _check(0 <= self.a_max <= 9, "task.a_max", f"must be in 0..9; got {self.a_max}")
        _check(0 <= self.b_max <= 9, "task.b_max", f"must be in 0..9; got {self.b_max}")
        _check(self.warmup_steps >= 0, "task.warmup_steps", "must be >= 0")
        _check(self.warmup_batch_size >= 1, "task.warmup_batch_size", "must be >= 1")
        _check(self.warmup_lr > 0, "task.warmup_lr", "must be > 0")


@dataclass
class DataConfig:
    train_batch_size: int = _f(32, "prompts per rollout step (each gets rollout.n responses)")
    shuffle: bool = _f(True, "reshuffle the prompts every epoch (seeded by trainer.seed and the epoch)")

    def __post_init__(self):
        _check(self.train_batch_size >= 1, "data.train_batch_size", f"must be >= 1; got {self.train_batch_size}")


@dataclass
class AlgorithmConfig:
    loss: str = _f("vespo", "policy loss of vespo_ext.policy_loss: vespo, grpo, gspo, sapo or cispo")
    agg: Optional[str] = _f(None, "loss aggregation (null: the loss's default): " + ", ".join(AGGS))
    loss_params: Dict[str, float] = _f({}, "parameters of the chosen loss, e.g. algorithm.loss_params.k_pos=2.0 "
                                           "(vespo: k_pos lambda_pos k_neg lambda_neg; grpo: clip_ratio_low/high/c)")
    adv_eps: float = _f(1e-6, "GRPO group advantage (R - mean) / (std + adv_eps)")
    norm_adv_by_std: bool = _f(True, "divide the group advantage by the group's reward std")
    behaviour_logp: str = _f("rollout", "old_logp for the loss: 'rollout' (log-probs the rollout engine sampled "
                                        "with) or 'recompute' (the learner recomputes them before its first update)")
    tis: bool = _f(False, "truncated importance sampling: old_logp recomputed by the learner and per-token weights "
                          "min(exp(recomputed - rollout), tis_cap) correct the train/inference mismatch")
    tis_cap: float = _f(2.0, "upper clip of the TIS weights")

    def __post_init__(self):
        _one_of(self.loss, "algorithm.loss", LOSSES)
        if self.agg is not None:
            _one_of(self.agg, "algorithm.agg", AGGS)
        _one_of(self.behaviour_logp, "algorithm.behaviour_logp", ("rollout", "recompute"))
        _check(self.adv_eps > 0, "algorithm.adv_eps", "must be > 0")
        _check(self.tis_cap > 0, "algorithm.tis_cap", "must be > 0")
        try:
            from vespo_ext import check_loss
            check_loss(self.loss, self.agg, **dict(self.loss_params))
        except ImportError:
            pass
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"algorithm.loss_params: {exc}") from None


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

    def __post_init__(self):
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
    backend: str = _f("hf", "generation engine: hf (Hugging Face generate; vllm arrives in a later release)")
    temperature: float = _f(1.0, "sampling temperature (the loss uses the same one for log-probs)")
    top_p: float = _f(1.0, "nucleus sampling; keep 1.0 so the behaviour log-probs match the sampler exactly")
    max_new_tokens: int = _f(4, "response length limit")
    dtype: str = _f("fp32", "rollout model dtype: fp32, or bf16 to create a train/inference mismatch")
    num_workers: int = _f(1, "rollout actors (prompt groups are split between them)")
    num_cpus: float = _f(0.5, "CPUs Ray reserves per rollout actor")
    num_gpus: float = _f(-1.0, "GPUs per rollout actor (-1: 1 on cuda, 0 on cpu)")

    def __post_init__(self):
        _check(self.n >= 1, "rollout.n", "must be >= 1")
        _check(self.backend != "vllm", "rollout.backend", "'vllm' is not implemented yet; use 'hf'")
        _one_of(self.backend, "rollout.backend", ("hf",))
        _check(self.temperature > 0, "rollout.temperature", "must be > 0")
        _check(0 < self.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
        _check(self.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
        _one_of(self.dtype, "rollout.dtype", ("fp32", "bf16", "fp16"))
        _check(self.num_workers >= 1, "rollout.num_workers", "must be >= 1")
        _check(self.num_cpus >= 0, "rollout.num_cpus", "must be >= 0")


@dataclass
class RewardConfig:
    fn: Optional[str] = _f(None, "reward function 'module:function' (prompt, response, ground_truth) -> float; "
                                 "null: the task's own verifier")
    num_procs: int = _f(2, "processes in the scoring pool")
    timeout_s: float = _f(5.0, "per-call time limit; a call past it scores 0 and counts in reward/timeouts")
    num_workers: int = _f(1, "reward actors")
    num_cpus: float = _f(0.25, "CPUs Ray reserves per reward actor")

    def __post_init__(self):
        if self.fn is not None:
            _check(":" in self.fn, "reward.fn", f"must look like 'package.module:function'; got {self.fn!r}")
        _check(self.num_procs >= 1, "reward.num_procs", "must be >= 1")
        _check(self.timeout_s > 0, "reward.timeout_s", "must be > 0")
        _check(self.num_workers >= 1, "reward.num_workers", "must be >= 1")


@dataclass
class ModelConfig:
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
class RayConfig:
    address: Optional[str] = _f(None, "Ray cluster to join (null: $RAY_ADDRESS if set, else start a local Ray)")
    num_cpus: Optional[int] = _f(None, "CPUs of a local Ray (null: all)")
    log_to_driver: bool = _f(False, "show the actors' stdout/stderr in this terminal")

    def __post_init__(self):
        _check(self.num_cpus is None or self.num_cpus >= 1, "ray.num_cpus", "must be >= 1")


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
        _check(self.trainer.resume is False or self.trainer.output_dir is not None, "trainer.resume",
               "needs trainer.output_dir (the run to continue)")

    # -- derived quantities -------------------------------------------------------------------
    @property
    def staleness(self) -> int:
        """N: optimizer steps per rollout step; mini-batch k of a step is k policy versions behind."""
        return self.data.train_batch_size // self.actor.ppo_mini_batch_size


def help_text() -> List[tuple]:
    """[(dotted key, default, help)] for every leaf field, in declaration order."""
    rows = []
    for group in dataclasses.fields(Config):
        for f in dataclasses.fields(group.default_factory):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f"{group.name}.{f.name}", default, f.metadata.get("help", "")))
    return rows


def load_config(config_file: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    """Defaults <- YAML file <- dotted key=value overrides, validated. Raises ConfigError."""
    schema = OmegaConf.structured(Config)
    try:
        layers = [schema]
        if config_file:
            if not os.path.isfile(config_file):
                raise ConfigError(f"--config: no such file: {config_file}")
            layers.append(OmegaConf.load(config_file))
        if overrides:
            bad = [o for o in overrides if "=" not in o or o.startswith("=")]
            if bad:
                raise ConfigError(f"overrides must look like key=value (e.g. trainer.total_steps=10); got {bad}")
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        return OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        msg = (getattr(exc, "msg", None) or str(exc)).splitlines()[0]
        raise ConfigError(f"{key + ': ' if key else ''}{msg}") from None


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))

