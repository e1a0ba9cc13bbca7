"""`vespo train` in sync mode: the driver loop. Reads top to bottom.

Per rollout step (policy version v on the rollout workers):
  1. the next data.train_batch_size prompts; every rollout worker generates rollout.n responses for
     its share, with per-token behaviour log-probs and the version v stamped on every token;
  2. the reward workers score the responses (process pool, time limit per call);
  3. GRPO group advantages;
  4. the learner takes N = train_batch_size / ppo_mini_batch_size optimizer steps, one per mini-batch
     of whole prompt groups, and reports the lag each sample was trained at (k for mini-batch k);
  5. the new weights (version v + N) go to the rollout workers through Ray in buckets, timed;
  6. metrics, provenance, progress; a checkpoint every trainer.save_every steps and at the end.
"""
from __future__ import annotations

import os
import random
import time
from collections import Counter

import torch

from . import checkpoint as ckpt
from .algorithm import group_advantages, merge_rollouts, split_groups
from .cluster import ray_session, start_actors, stop_actors
from .config import Config, ConfigError, to_yaml
from .interrupt import GracefulInterrupt, Interrupted, aborted
from .metrics_log import Progress, RunLog
from .reward import resolve_fn, reward_spec
from .task import PromptStream, load_prompts, make_tokenizer, task_prompts, warmup_max_answer, warmup_texts

LEARNER_KEYS = ("input_ids", "attention_mask", "responses", "response_mask", "old_logp", "token_version", "uid",
                "prompt_id", "advantages")


def resolve_run_dir(cfg: Config) -> str:
    """The run directory; refuses to mix a new run into an old one unless resuming."""
    if cfg.trainer.output_dir is None:
        cfg.trainer.output_dir = os.path.join("runs", f"{cfg.trainer.experiment_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = cfg.trainer.output_dir
    if not cfg.trainer.resume and os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        raise FileExistsError(f"{run_dir} already holds a run; continue it with trainer.resume=true or choose "
                              "another trainer.output_dir")
    os.makedirs(run_dir, exist_ok=True)
    return run_dir


def train(cfg: Config) -> str:
    """Run (or resume) a training run in cfg.trainer.mode; returns the run directory.

    Raises Interrupted after a Ctrl-C (a checkpoint was saved), TrainingAborted on a fatal actor failure.
    """
    from .async_loop import async_loop

    run_dir = resolve_run_dir(cfg)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(to_yaml(cfg))
    progress = Progress(cfg.trainer.progress, cfg.trainer.total_steps, 0, cfg.trainer.log_every)
    try:  # the tokenizer and the prompts load here, so a bad model.path or data file fails before any actor starts
        tok = make_tokenizer(cfg)
        prompts = load_prompts(cfg, tok, log=progress.print)
        resolve_fn(reward_spec(cfg))  # importable here (the reward workers import it again)
    except ValueError as exc:
        progress.close()
        raise ConfigError(str(exc)) from None
    loop = async_loop if cfg.trainer.mode == "async" else _loop
    with ray_session(cfg), GracefulInterrupt(progress.print) as stop:
        import ray

        actors = start_actors(cfg)
        try:
            loop(cfg, run_dir, actors, progress, stop, tok, prompts)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            from .learner_group import LearnerFailed

            learner = isinstance(exc, LearnerFailed) or "Learner" in str(exc).split("\n")[0]
            raise aborted("the learner died" if learner else "an actor failed", exc, run_dir) from None
        finally:
            progress.close()
            stop_actors(actors)
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
            progress.print(f"format warm-up: {w['warmup/steps']} steps, loss {w['warmup/loss_first']:.3f} -> "
                           f"{w['warmup/loss_last']:.3f} ({w['warmup/seconds']:.1f}s)")
    if start_step >= tc.total_steps:
        progress.print(f"nothing to do: the run is at step {start_step} and trainer.total_steps={tc.total_steps}")
    return start_step, state, learner_info


def _loop(cfg: Config, run_dir: str, actors, progress: Progress, stop: GracefulInterrupt, tok, all_prompts) -> None:
    import ray

    tc, n, tb = cfg.trainer, cfg.rollout.n, cfg.data.train_batch_size
    stream = PromptStream(all_prompts, tc.seed, cfg.data.shuffle)
    start_step, state, learner_info = start_run(cfg, run_dir, actors, progress)
    if state is not None:
        stream.load_state_dict(state["data"])
    progress.print(f"run dir {run_dir}: {learner_info['params']:,} params, staleness N={cfg.staleness}, "
                   f"{tb}x{n} responses/step, learner on {learner_info['device']} "
                   f"(ZeRO-{learner_info['zero_stage']}, {learner_info['threads']} threads), "
                   f"loss kernels: {learner_info['loss_kernels']}")
    _sync_weights(cfg, actors)  # the rollout workers start from the learner's weights (fresh or restored)
    log = RunLog(run_dir, start_step, tc.tensorboard, tc.provenance)
    progress.start_at(start_step)
    warned_reward = False
    try:
        for step in range(start_step, tc.total_steps):
            t0 = time.perf_counter()
            # 1. rollout: each worker gets a contiguous share of the prompt groups
            prompts = stream.next_batch(tb)
            shares = split_groups(tb, len(actors.rollout))
            parts = ray.get([w.generate.remote([prompts[i] for i in r], step, step * tb * n + r.start * n)
                             for w, r in zip(actors.rollout, shares)])
            batch = merge_rollouts(parts, tok.pad_token_id)
            t_roll = time.perf_counter()
            # 2. rewards
            scored = _score(actors, batch, prompts, n)
            rewards = torch.tensor(scored["rewards"], dtype=torch.float32)
            if (scored["errors"] or scored["timeouts"]) and not warned_reward:
                warned_reward = True  # once per run; metrics.jsonl counts them every step
                progress.print(f"reward: {scored['errors']} errors, {scored['timeouts']} timeouts at step {step} "
                               f"(scored 0; see reward/errors, reward/timeouts) {scored['error_examples']}")
            t_rew = time.perf_counter()
            # 3. advantages
            batch["advantages"] = group_advantages(rewards, n, cfg.algorithm.adv_eps, cfg.algorithm.norm_adv_by_std)
            # 4. N optimizer steps
            out = ray.get(actors.learner.train_batch.remote({k: batch[k] for k in LEARNER_KEYS}))
            t_train = time.perf_counter()
            # 5. weights to the rollout workers
            sync_s, sync_mb = _sync_weights(cfg, actors)
            step_s = time.perf_counter() - t0
            # 6. metrics
            m, lags, prov = batch_metrics(batch, rewards, out, tok.eos_token_ids, step_s)
            m.update({"reward/timeouts": scored["timeouts"], "reward/errors": scored["errors"],
                      "perf/weight_sync_mb": sync_mb, "time/rollout_s": t_roll - t0, "time/reward_s": t_rew - t_roll,
                      "time/learner_s": t_train - t_rew, "time/weight_sync_s": sync_s})
            log.log(step, m, lags, prov if tc.provenance else None)
            progress.update(step, m)
            done = step + 1
            if done == tc.total_steps or (tc.save_every and done % tc.save_every == 0) or stop.requested:
                _save(cfg, run_dir, actors, {"data": stream.state_dict()}, done)
            if stop.requested and done < tc.total_steps:
                raise Interrupted(done, run_dir)
    finally:
        log.close()


def batch_metrics(batch: dict, rewards: torch.Tensor, out: dict, eos_ids, step_s: float) -> tuple:
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


def _score(actors, batch, prompts, n: int) -> dict:
    """Split the responses between the reward workers; gather the rewards in order (rows: n per prompt, in order)."""
    import ray

    sources = [p.data_source for p in prompts for _ in range(n)]
    extras = [p.extra_info for p in prompts for _ in range(n)]
    shares = split_groups(len(batch["texts"]), len(actors.reward))
    outs = ray.get([w.score.remote([batch["prompts"][i] for i in r], [batch["texts"][i] for i in r],
                                   [batch["ground_truths"][i] for i in r], [sources[i] for i in r],
                                   [extras[i] for i in r]) for w, r in zip(actors.reward, shares)])
    return {"rewards": [x for o in outs for x in o["rewards"]], "timeouts": sum(o["timeouts"] for o in outs),
            "errors": sum(o["errors"] for o in outs), "error_examples": [e for o in outs for e in o["error_examples"]]}


def _sync_weights(cfg, actors) -> tuple:
    """Learner -> every rollout worker, bucketed through the object store; (seconds, MiB per worker)."""
    import ray

    t0 = time.perf_counter()
    pub = ray.get(actors.learner.publish_weights.remote(cfg.weight_sync.bucket_mb))
    got = ray.get([w.update_weights.remote(pub["refs"], pub["version"]) for w in actors.rollout])
    return time.perf_counter() - t0, got[0]["bytes"] / 2**20


def _save(cfg, run_dir, actors, state: dict, done: int, extra=None) -> None:
    """Learner checkpoint + trainer_state.json (+ `extra` files written into the tag first); then `latest`."""
    import ray

    tag = ckpt.tag_for(done)
    ray.get(actors.learner.save.remote(ckpt.ckpt_root(run_dir), tag))
    version = ray.get(actors.learner.info.remote())["version"]
    if extra is not None:
        extra(os.path.join(ckpt.ckpt_root(run_dir), tag))
    ckpt.write_trainer_state(run_dir, tag, {"step": done, "version": version, "mode": cfg.trainer.mode, **state})
    ckpt.prune(run_dir, cfg.trainer.keep_checkpoints)
