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

import time

import torch

from ..batch import group_advantages, learner_view, merge_rollouts, split_groups
from ..config import Config
from ..data.prompt import PromptStream
from ..metrics_log import Progress, RunLog, plural
from ..runtime import get_within
from .common import batch_metrics, save_checkpoint, score_batch, start_run, sync_weights
from .interrupt import GracefulInterrupt, Interrupted


def sync_loop(cfg: Config, run_dir: str, actors, progress: Progress, stop: GracefulInterrupt, tok, all_prompts) -> None:
    tc, n, tb = cfg.trainer, cfg.rollout.n, cfg.data.train_batch_size
    stream = PromptStream(all_prompts, tc.seed, cfg.data.shuffle)
    start_step, state, learner_info = start_run(cfg, run_dir, actors, progress)
    if state is not None:
        stream.load_state_dict(state["data"])
    progress.print(f"run dir {run_dir}: {learner_info['params']:,} params, staleness N={cfg.staleness}, "
                   f"{tb}x{n} responses/step, learner on {learner_info['device']} "
                   f"(ZeRO-{learner_info['zero_stage']}, {plural(learner_info['threads'], 'thread')}), "
                   f"loss kernels: {learner_info['loss_kernels']}")
    sync_weights(cfg, actors, timed=False)  # the rollout workers start from the learner's weights (fresh or restored)
    if stop.requested:  # Ctrl-C during the start-up: nothing trained, nothing to save
        raise Interrupted(start_step, run_dir, saved=False)
    stop.started = True
    log = RunLog(run_dir, start_step, tc.tensorboard, tc.provenance)
    progress.start_at(start_step)
    warned_reward = False
    try:
        for step in range(start_step, tc.total_steps):
            t0 = time.perf_counter()
            # 1. rollout: each worker gets a contiguous share of the prompt groups
            prompts = stream.next_batch(tb)
            shares = split_groups(tb, len(actors.rollout))
            parts = get_within([w.generate.remote([prompts[i] for i in r], step, step * tb * n + r.start * n)
                                for w, r in zip(actors.rollout, shares)],
                               [f"rollout worker {i} (generate)" for i in range(len(shares))], tc.actor_timeout_s)
            batch = merge_rollouts(parts, tok.pad_token_id)
            t_roll = time.perf_counter()
            # 2. rewards
            scored = score_batch(actors, batch, prompts, n, tc.actor_timeout_s)
            rewards = torch.tensor(scored["rewards"], dtype=torch.float32)
            if (scored["errors"] or scored["timeouts"]) and not warned_reward:
                warned_reward = True  # once per run; metrics.jsonl counts them every step
                progress.print(f"reward: {scored['errors']} errors, {scored['timeouts']} timeouts at step {step + 1} "
                               f"(scored 0; see reward/errors, reward/timeouts) {scored['error_examples']}")
            t_rew = time.perf_counter()
            # 3. advantages
            batch["advantages"] = group_advantages(rewards, n, cfg.algorithm.adv_eps, cfg.algorithm.norm_adv_by_std)
            # 4. N optimizer steps
            out = get_within(actors.learner.train_batch.remote(learner_view(batch)), "the learner (train_batch)",
                             tc.actor_timeout_s)
            t_train = time.perf_counter()
            # 5. weights to the rollout workers
            sync_s, sync_mb = sync_weights(cfg, actors)
            step_s = time.perf_counter() - t0
            # 6. metrics
            m, lags, prov = batch_metrics(batch, rewards, out, tok.eos_token_ids, step_s)
            m.update({"reward/timeouts": scored["timeouts"], "reward/errors": scored["errors"],
                      "perf/weight_sync_mb": sync_mb, "time/rollout_s": t_roll - t0, "time/reward_s": t_rew - t_roll,
                      "time/learner_s": t_train - t_rew, "time/weight_sync_s": sync_s})
            done = step + 1  # steps are numbered 1..total_steps in metrics.jsonl, the bar and the checkpoints
            log.log(done, m, lags, prov if tc.provenance else None)
            progress.update(step, m)
            if done == tc.total_steps or (tc.save_every and done % tc.save_every == 0) or stop.requested:
                save_checkpoint(cfg, run_dir, actors, {"data": stream.state_dict()}, done)
            if stop.requested and done < tc.total_steps:
                raise Interrupted(done, run_dir)
    finally:
        log.close()
