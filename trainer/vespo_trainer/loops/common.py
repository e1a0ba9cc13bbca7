"""What both driver loops share: the run directory, the start (resume or warm-up), scoring a batch,
a weight sync, the metrics of a trained batch and a checkpoint."""
from __future__ import annotations

import os
import random
import time
from collections import Counter

import torch

from .. import checkpoint as ckpt
from ..batch import Batch, split_groups
from ..config import Config
from ..data.arith import task_prompts, warmup_max_answer, warmup_texts
from ..errors import ConfigError, RunDirExists
from ..metrics_log import Progress, plural
from ..runtime import get_within


def resolve_run_dir(cfg: Config) -> str:
    """The run directory; refuses to mix a new run into an old one unless resuming."""
    if cfg.trainer.output_dir is None:
        cfg.trainer.output_dir = os.path.join("runs", f"{cfg.trainer.experiment_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = cfg.trainer.output_dir
    if not cfg.trainer.resume and os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        raise RunDirExists(f"{run_dir} already holds a run; continue it with trainer.resume=true or choose "
                              "another trainer.output_dir")
    os.makedirs(run_dir, exist_ok=True)
    return run_dir


def start_run(cfg: Config, run_dir: str, actors, progress: Progress):
    """Common start of both loops: restore a checkpoint or warm up; (start_step, trainer_state or None, info)."""
    import ray

    tc = cfg.trainer
    learner_info = ray.get(actors.learner.info.remote())
    tag = ckpt.latest(run_dir) if tc.resume else None
    start_step, state = 0, None
    if tag is not None:
        state = ckpt.read_trainer_state(run_dir, tag)
        if state.get("mode", "sync") != tc.mode:
            raise ConfigError(f"trainer.mode: the checkpoint {tag} was written in {state.get('mode', 'sync')!r} "
                              f"mode; resume it in that mode")
        ray.get(actors.learner.load.remote(ckpt.ckpt_root(run_dir), tag))
        start_step = state["step"]
        progress.print(f"resumed {run_dir} from {tag} (step {start_step}, policy version {state['version']})")
    else:
        if tc.resume:
            progress.print(f"trainer.resume=true but {run_dir} has no checkpoint yet: starting from step 0")
        if cfg.task.warmup_steps and cfg.task.name == "arith":
            rng = random.Random(f"{tc.seed}/warmup")
            prompts = task_prompts(cfg.task)
            pairs = [warmup_texts(prompts, cfg.task.warmup_batch_size, rng, warmup_max_answer(cfg.task))
                     for _ in range(cfg.task.warmup_steps)]
            w = ray.get(actors.learner.warmup.remote(pairs))
            progress.print(f"format warm-up: {plural(w['warmup/steps'], 'step')}, loss {w['warmup/loss_first']:.3f} -> "
                           f"{w['warmup/loss_last']:.3f} ({w['warmup/seconds']:.1f}s)")
    if start_step >= tc.total_steps:
        progress.print(f"nothing to do: the run is at step {start_step} and trainer.total_steps={tc.total_steps}")
    return start_step, state, learner_info


def batch_metrics(batch: Batch, rewards: torch.Tensor, out: dict, eos_ids, step_s: float) -> tuple:
    """(metrics, lags, provenance) of one trained batch: rewards, lengths, the lag histogram, learner metrics."""
    prov = out["provenance"]
    lags = [u - g for u, g in zip(prov["update_version"], prov["gen_version"])]
    mask = batch["response_mask"]
    m = {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "response/length_mean": float(mask.sum(1).float().mean()),
        "response/ended_frac": float((torch.isin(batch["responses"], torch.tensor(list(eos_ids))) & mask)
                                     .any(1).float().mean()),
        "staleness/mean": sum(lags) / len(lags), "staleness/max": max(lags), "staleness/min": min(lags),
        **out["metrics"],
        "perf/tokens_per_s": int(batch["attention_mask"].sum()) / step_s, "perf/response_tokens": int(mask.sum()),
        "time/step_s": step_s,
    }
    m.update({f"staleness/hist_{lag}": c for lag, c in sorted(Counter(lags).items())})
    return m, lags, {**prov, "lag": lags, "reward": rewards.tolist()}


def score_batch(actors, batch, prompts, n: int, timeout_s: float) -> dict:
    """Split the responses between the reward workers; gather the rewards in order (rows: n per prompt, in order)."""
    sources = [p.data_source for p in prompts for _ in range(n)]
    extras = [p.extra_info for p in prompts for _ in range(n)]
    shares = split_groups(len(batch["texts"]), len(actors.reward))
    refs = [w.score.remote([batch["prompts"][i] for i in r], [batch["texts"][i] for i in r],
                           [batch["ground_truths"][i] for i in r], [sources[i] for i in r],
                           [extras[i] for i in r]) for w, r in zip(actors.reward, shares)]
    outs = get_within(refs, [f"reward worker {i} (score)" for i in range(len(refs))], timeout_s)
    return {"rewards": [x for o in outs for x in o["rewards"]], "timeouts": sum(o["timeouts"] for o in outs),
            "errors": sum(o["errors"] for o in outs), "error_examples": [e for o in outs for e in o["error_examples"]]}


def sync_weights(cfg, actors, timed: bool = True) -> tuple:
    """Learner -> every rollout worker, bucketed through the object store; (seconds, MiB per worker).
    timed=False: the first sync of a run (it waits for the rollout workers' start-up), without the timeout."""
    t0 = time.perf_counter()
    limit = cfg.trainer.actor_timeout_s if timed else 0
    pub = get_within(actors.learner.publish_weights.remote(cfg.weight_sync.bucket_mb), "the learner (publish_weights)",
                     limit)
    got = get_within([w.update_weights.remote(pub["refs"], pub["version"]) for w in actors.rollout],
                     [f"rollout worker {i} (update_weights)" for i in range(len(actors.rollout))], limit)
    return time.perf_counter() - t0, got[0]["bytes"] / 2**20


def save_checkpoint(cfg, run_dir, actors, state: dict, done: int, extra=None) -> None:
    """Learner checkpoint + trainer_state.json (+ `extra` files written into the tag first); then `latest`."""
    tag = ckpt.tag_for(done)
    limit = cfg.trainer.actor_timeout_s
    get_within(actors.learner.save.remote(ckpt.ckpt_root(run_dir), tag), "the learner (save)", limit)
    version = get_within(actors.learner.info.remote(), "the learner (info)", limit)["version"]
    if extra is not None:
        extra(os.path.join(ckpt.ckpt_root(run_dir), tag))
    ckpt.write_trainer_state(run_dir, tag, {"step": done, "version": version, "mode": cfg.trainer.mode, **state})
    ckpt.prune(run_dir, cfg.trainer.keep_checkpoints)
