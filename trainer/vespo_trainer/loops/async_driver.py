"""`vespo train trainer.mode=async`: rollout and learner run at the same time. Reads top to bottom.

Semantics (docs/spec.md "Staleness"; veRL's fully-async meaning of the same keys, docs/async.md):
  - the rollout workers generate prompt groups continuously, async.rollout_chunk groups per call; each
    finished call is scored by a reward worker and its groups enter a FIFO buffer;
  - the learner takes an optimizer step whenever it is idle and the buffer holds
    require_batches x ppo_mini_batch_size groups (the oldest ones);
  - after every async.trigger_parameter_sync_step optimizer steps the learner publishes its weights
    (bucketed, Ray object store) and waits until they have landed on every rollout worker. Without
    partial rollout the push waits for the generate calls in flight; with async.partial_rollout they pause
    at their next token, load the weights and continue (every token keeps its version and log-prob);
  - the window: S = trigger_parameter_sync_step x require_batches x ppo_mini_batch_size groups are trained
    between two pushes; when a push lands the rollout side may start groups until
    floor((1 + staleness_threshold) x S) groups are started-but-not-trained ("outstanding"). With
    staleness_threshold = 0 and trigger 1 every sample is trained at lag 0 (= sync with N = 1).
Fault tolerance: a rollout or reward worker that dies is replaced (same rank, current weights) and its
prompt groups are re-issued under the same sample ids; a dead learner ends the run with a message
(resume from the last checkpoint). Checkpoints hold the buffer and the groups in flight, so a resumed
run trains every started group exactly once. One Ctrl-C checkpoints at the next step and stops.
"""
from __future__ import annotations

import enum
import json
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional

import torch

from .. import checkpoint as ckpt
from ..batch import Batch, group_advantages, learner_view, merge_rollouts, select_rows
from ..cluster import restart_reward, restart_rollout
from ..data.prompt import PromptStream
from ..metrics_log import RunLog, plural
from ..runtime import ActorTimeout, get_within
from .common import batch_metrics, save_checkpoint, start_run
from .interrupt import Interrupted, TrainingAborted, aborted

BUFFER_FILE = "async_buffer.pt"
LEARNER_QUEUE = 2  # train calls queued on the learner: it starts the next step while the driver logs the last


class Group(NamedTuple):
    """A prompt group to generate: its prompt and the sample id of its first response (then + 1, ...)."""
    prompt_id: int
    uid_base: int


# What each ObjectRef in flight is (AsyncDriver.inflight): one record type per kind of call.
@dataclass
class Generating:
    worker: int
    groups: List[Group]


@dataclass
class Scoring:
    worker: int
    groups: List[Group]
    part: Batch


@dataclass
class Training:
    batch: Batch
    rewards: torch.Tensor
    t_issue: float


@dataclass
class Publishing:
    pass


@dataclass
class Loading:
    worker: int


def _call_name(rec) -> str:
    """The actor and method of an ObjectRef in flight (for the hung-actor error)."""
    if isinstance(rec, Generating):
        return f"rollout worker {rec.worker} (generate)"
    if isinstance(rec, Scoring):
        return f"reward worker {rec.worker} (score)"
    if isinstance(rec, Loading):
        return f"rollout worker {rec.worker} (update_weights)"
    return "the learner (train_batch)" if isinstance(rec, Training) else "the learner (publish_weights)"


class Inflight(dict):
    """ObjectRef -> record (Generating | Scoring | Training | Publishing | Loading), remembering when each
    was issued: a call older than trainer.actor_timeout_s is a hung actor."""

    def __init__(self):
        super().__init__()
        self.since = {}

    def __setitem__(self, ref, rec) -> None:
        super().__setitem__(ref, rec)
        self.since[ref] = time.monotonic()

    def __delitem__(self, ref) -> None:
        super().__delitem__(ref)
        self.since.pop(ref, None)

    def pop(self, ref, *default):
        self.since.pop(ref, None)
        return super().pop(ref, *default)

    def check(self, timeout_s: float) -> None:
        """ActorTimeout naming every call in flight for longer than timeout_s (0: no limit)."""
        if not timeout_s or not self.since:
            return
        now = time.monotonic()
        late = [_call_name(self[ref]) for ref, t in self.since.items() if now - t > timeout_s]
        if late:
            raise ActorTimeout(", ".join(dict.fromkeys(late)), timeout_s)


class Stage(enum.Enum):
    PUBLISH = "publish"  # the learner publishes its weights (queued behind the step that ends the window)
    DRAIN = "drain"      # published; without partial rollout, waiting for the generate calls in flight
    LOAD = "load"        # the rollout workers load the weights
    LANDED = "landed"    # on every worker; the next window opens once the steps before it are answered


@dataclass
class Push:
    """The weight push in progress."""
    t0: float
    stage: Stage = Stage.PUBLISH
    pub: Optional[dict] = None                     # publish_weights' answer: {"refs", "version", ...}
    loads: Dict[object, int] = field(default_factory=dict)  # update_weights ref -> rollout worker
    mb: float = 0.0                                # MiB per worker


def async_loop(cfg, run_dir, actors, progress, stop, tok, prompts) -> None:
    AsyncDriver(cfg, run_dir, actors, progress, stop, tok, prompts).run()


class AsyncDriver:
    def __init__(self, cfg, run_dir, actors, progress, stop, tok, prompts):
        self.cfg, self.run_dir, self.actors, self.progress, self.stop = cfg, run_dir, actors, progress, stop
        self.n, self.ac = cfg.rollout.n, cfg.async_
        self.tok = tok
        self.prompts = prompts  # indexed by prompt_id
        self.stream = PromptStream(self.prompts, cfg.trainer.seed, cfg.data.shuffle)
        self.next_group = 0        # groups taken from the stream so far (uids: group * n + j)
        self.calls = 0             # generate calls so far (seeds the sampling)
        self.calls_scored = 0
        self.pending = deque()     # Groups to (re)issue before new ones
        self.buffer = deque()      # scored groups (a Batch of one group, with its rewards), oldest first
        self.inflight = Inflight()  # ObjectRef -> Generating | Scoring | Training | Publishing | Loading
        self.busy = [False] * len(actors.rollout)
        self.outstanding = 0       # groups started and not yet trained (or dropped)
        self.budget = 0            # groups the rollout side may still start in this window
        self.learner_inflight = 0  # train_batch calls issued and not answered (at most LEARNER_QUEUE)
        self.steps_issued = 0      # optimizer steps issued so far (self.step: answered)
        self.steps_since_push = 0  # steps issued since the last push was issued
        self.push: Optional[Push] = None  # the weight push in progress
        self.applied = None        # the published weights the rollout workers run
        self.stats = {"dropped": 0, "restarts": 0, "reward_restarts": 0}
        self._reset_interval()

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> None:
        import ray

        cfg, tc = self.cfg, self.cfg.trainer
        self.step, state, info = start_run(cfg, self.run_dir, self.actors, self.progress)
        self.steps_issued = self.step
        if state is not None:
            self._restore(state)
        self.progress.print(
            f"run dir {self.run_dir}: {info['params']:,} params, async: {plural(cfg.async_step_groups, 'group')} x "
            f"{plural(self.n, 'response')} per optimizer step, weights pushed every "
            f"{plural(self.ac.trigger_parameter_sync_step, 'step')}, at most {plural(cfg.async_window, 'group')} "
            f"outstanding, {plural(cfg.rollout_chunk, 'group')} per generate call, "
            f"partial rollout {'on' if self.ac.partial_rollout else 'off'}; learner on {info['device']} "
            f"(ZeRO-{info['zero_stage']}), loss kernels: {info['loss_kernels']}")
        # the first sync waits for the rollout workers' start-up (model load, engine set-up): not timed
        pub = ray.get(self.actors.learner.publish_weights.remote(cfg.weight_sync.bucket_mb))
        ray.get([w.update_weights.remote(pub["refs"], pub["version"]) for w in self.actors.rollout])
        self.applied, self.rollout_version = pub, pub["version"]
        if self.stop.requested:  # Ctrl-C during the start-up: nothing trained, nothing to save
            raise Interrupted(self.step, self.run_dir, saved=False)
        self.stop.started = True
        self.budget = max(0, cfg.async_window - self.outstanding)
        self._write_pids()
        self.log = RunLog(self.run_dir, self.step, tc.tensorboard, tc.provenance)
        self.progress.start_at(self.step)
        self._reset_interval()
        try:
            while self.step < tc.total_steps:
                if self.stop.requested and not self.learner_inflight:
                    self._save()
                    raise Interrupted(self.step, self.run_dir)
                self._issue_rollouts()
                self._maybe_load()
                while self._maybe_train():
                    pass
                if not self.inflight:
                    raise TrainingAborted("async loop: nothing in flight and nothing to train (a bug; please "
                                          f"report with the config): {self._describe()}")
                ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=1.0)
                for ref in ready:
                    self._handle(ref)
                self.inflight.check(tc.actor_timeout_s)
        finally:
            self.log.close()

    # -- rollout side ----------------------------------------------------------------------------
    def _issue_rollouts(self) -> None:
        if self.stop.requested or (self.push is not None and not self.ac.partial_rollout):
            return  # without partial rollout a push waits for the calls in flight: start none now
        chunk = self.cfg.rollout_chunk
        for w, worker in enumerate(self.actors.rollout):
            if self.busy[w]:
                continue
            items = []
            while self.pending and len(items) < chunk:
                items.append(self.pending.popleft())
            while len(items) < chunk and self.budget > 0:
                p = self.stream.next_batch(1)[0]
                items.append(Group(p.prompt_id, self.next_group * self.n))
                self.next_group += 1
                self.budget -= 1
                self.outstanding += 1
            if not items:
                return
            ref = worker.generate.remote([self.prompts[pid] for pid, _ in items], self.calls, items[0][1],
                                         group_uids=[u for _, u in items], interruptible=self.ac.partial_rollout)
            self.calls += 1
            self.busy[w] = True
            self.inflight[ref] = Generating(w, items)

    def _on_generated(self, ref, rec: Generating) -> None:
        import ray

        w, items = rec.worker, rec.groups
        self.busy[w] = False
        try:
            part = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            self._restart_rollout(w, exc)
            self.pending.extendleft(reversed(items))  # same prompts, same sample ids, first in line
            return
        self.iv["gen_s"] += part["stats"]["gen_s"]
        self._score(self.calls_scored % len(self.actors.reward), items, part)  # round robin
        self.calls_scored += 1

    def _score(self, r: int, items, part) -> None:
        n, prompts = self.n, [self.prompts[pid] for pid, _ in items]
        ref = self.actors.reward[r].score.remote(part["prompts"], part["texts"], part["ground_truths"],
                                                 [p.data_source for p in prompts for _ in range(n)],
                                                 [p.extra_info for p in prompts for _ in range(n)])
        self.inflight[ref] = Scoring(r, items, part)

    def _on_scored(self, ref, rec: Scoring) -> None:
        import ray

        r, items, part = rec.worker, rec.groups, rec.part
        try:
            scored = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            self.progress.print(f"reward worker {r} died ({type(exc).__name__}); restarting it and re-scoring")
            restart_reward(self.cfg, self.actors, r)
            self.stats["reward_restarts"] += 1
            self._score(r, items, part)
            return
        self.iv["timeouts"] += scored["timeouts"]
        self.iv["errors"] += scored["errors"]
        rewards = torch.tensor(scored["rewards"], dtype=torch.float32)
        n = self.n
        for i in range(len(items)):
            rows = slice(i * n, (i + 1) * n)
            g = select_rows(part, rows)
            g.pop("stats", None)
            g["rewards"] = rewards[rows]
            self.buffer.append(g)

    def _restart_rollout(self, w: int, exc) -> None:
        """Replace dead worker w: its other calls are dropped (their groups re-issued), it gets the weights
        the rollout side runs, and the weights of a push in progress."""
        import ray

        self.progress.print(f"rollout worker {w} died ({type(exc).__name__}); restarting it and re-issuing its "
                            "prompt groups")
        for ref, rec in list(self.inflight.items()):
            if isinstance(rec, (Generating, Loading)) and rec.worker == w:
                del self.inflight[ref]
                if isinstance(rec, Generating):
                    self.pending.extendleft(reversed(rec.groups))
                else:
                    self.push.loads.pop(ref, None)
        self.busy[w] = False
        worker = restart_rollout(self.cfg, self.actors, w)
        ray.get(worker.update_weights.remote(self.applied["refs"], self.applied["version"]))
        self.stats["restarts"] += 1
        self._write_pids()
        if self.push is not None and self.push.stage is Stage.LOAD:
            ref = worker.update_weights.remote(self.push.pub["refs"], self.push.pub["version"])
            self.push.loads[ref] = w
            self.inflight[ref] = Loading(w)

    # -- weight push -----------------------------------------------------------------------------
    def _start_push(self) -> None:
        ref = self.actors.learner.publish_weights.remote(self.cfg.weight_sync.bucket_mb)
        self.push = Push(t0=time.perf_counter())
        self.inflight[ref] = Publishing()

    def _maybe_load(self) -> None:
        p = self.push
        if p is None or p.stage is not Stage.DRAIN:
            return
        if not self.ac.partial_rollout and any(isinstance(r, Generating) for r in self.inflight.values()):
            return
        p.stage = Stage.LOAD
        for w, worker in enumerate(self.actors.rollout):
            ref = worker.update_weights.remote(p.pub["refs"], p.pub["version"])
            p.loads[ref] = w
            self.inflight[ref] = Loading(w)

    def _on_loaded(self, ref, rec: Loading) -> None:
        import ray

        p, w = self.push, rec.worker
        p.loads.pop(ref, None)
        try:
            got = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            self._restart_rollout(w, exc)  # the new worker is given these weights there
            return
        p.mb = got["bytes"] / 2**20
        if not p.loads:
            self.applied, self.rollout_version = p.pub, p.pub["version"]
            self.iv["sync_s"] += time.perf_counter() - p.t0
            self.iv["sync_mb"] = p.mb
            self.iv["syncs"] += 1
            p.stage = Stage.LANDED
            self._close_push()

    def _close_push(self) -> None:
        """Open the next window once the push has landed AND the driver has the results of every step
        trained before it (the learner group answers steps and the publish through separate tasks, so they
        may arrive in either order): budget = (1 + threshold) x S - the groups still outstanding."""
        if self.push is not None and self.push.stage is Stage.LANDED and not self.learner_inflight:
            self.budget = max(0, self.cfg.async_window - self.outstanding)
            self.push = None

    # -- learner side ----------------------------------------------------------------------------
    def _maybe_train(self) -> bool:
        """Issue the next optimizer step if the learner may take it now; True if one was issued."""
        tc = self.cfg.trainer
        if (self.learner_inflight >= LEARNER_QUEUE or self.stop.requested or self.push is not None
                or self.steps_issued >= tc.total_steps):
            return False
        if tc.save_every and self.steps_issued % tc.save_every == 0 and self.steps_issued > self.step:
            return False  # a checkpoint is due after the steps in flight: it must see exactly those
        if self.ac.max_lag >= 0:
            while self.buffer and self._lag(self.buffer[0]) > self.ac.max_lag:
                self.buffer.popleft()
                self.outstanding -= 1
                self.budget += 1  # its slot in the window is free again (else a window of drops would stall)
                self.stats["dropped"] += self.n
        k = self.cfg.async_step_groups
        if len(self.buffer) < k:
            return False
        groups = [self.buffer.popleft() for _ in range(k)]
        batch = merge_rollouts(groups, self.tok.pad_token_id)
        rewards = torch.cat([g["rewards"] for g in groups])
        batch["advantages"] = group_advantages(rewards, self.n, self.cfg.algorithm.adv_eps,
                                               self.cfg.algorithm.norm_adv_by_std)
        ref = self.actors.learner.train_batch.remote(learner_view(batch))
        self.inflight[ref] = Training(batch, rewards, time.perf_counter())
        self.learner_inflight += 1
        self.steps_issued += 1
        self.steps_since_push += 1
        if self.steps_since_push == self.ac.trigger_parameter_sync_step and self.steps_issued < tc.total_steps:
            # queued right behind that step on the learner: it publishes as soon as the step is done, and no
            # further step is issued until the push has landed on every rollout worker
            self.steps_since_push = 0
            self._start_push()
        return True

    def _lag(self, group) -> int:
        """The lag this group would be trained at now (learner version - oldest version of its tokens)."""
        v = group["token_version"].masked_fill(~group["response_mask"], 1 << 62).min()
        return self.version - int(v)

    @property
    def version(self) -> int:
        """The learner version the next issued step will train at."""
        return self.rollout_version + self.steps_since_push

    def _on_trained(self, ref, rec: Training) -> None:
        import ray

        batch, rewards = rec.batch, rec.rewards
        try:
            out = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            raise aborted("the learner died in train_batch", exc, self.run_dir) from None
        self.learner_inflight -= 1
        self.outstanding -= rewards.numel() // self.n
        step = self.step
        self.step += 1
        tc = self.cfg.trainer
        if self.step == tc.total_steps or (tc.save_every and self.step % tc.save_every == 0):
            self._save()  # nothing is in flight on the learner here (_maybe_train stops at save boundaries)
        self._close_push()
        while self._maybe_train():  # keep the learner's queue full before the driver logs
            pass
        self._log(step, batch, rewards, out, time.perf_counter() - rec.t_issue)

    # -- events ----------------------------------------------------------------------------------
    def _handle(self, ref) -> None:
        rec = self.inflight.pop(ref)
        handler = {Generating: self._on_generated, Scoring: self._on_scored, Training: self._on_trained,
                   Publishing: self._on_published, Loading: self._on_loaded}[type(rec)]
        handler(ref, rec)

    def _on_published(self, ref, rec: Publishing) -> None:
        import ray

        try:
            self.push.pub = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            raise aborted("the learner died while publishing weights", exc, self.run_dir) from None
        # the push is timed from here (+ the learner's own publish time): the publish call was queued
        # behind an optimizer step, which is not weight-sync time
        self.push.t0 = time.perf_counter() - self.push.pub.get("seconds", 0.0)
        self.push.stage = Stage.DRAIN

    # -- metrics, checkpoints --------------------------------------------------------------------
    def _reset_interval(self) -> None:
        self.iv = {"t0": time.perf_counter(), "gen_s": 0.0, "timeouts": 0, "errors": 0, "sync_s": 0.0,
                   "sync_mb": 0.0, "syncs": 0}

    def _log(self, step, batch, rewards, out, learner_s) -> None:
        interval = time.perf_counter() - self.iv["t0"]
        m, lags, prov = batch_metrics(batch, rewards, out, self.tok.eos_token_ids, interval)
        workers = len(self.actors.rollout)
        m.update({
            "reward/timeouts": self.iv["timeouts"], "reward/errors": self.iv["errors"],
            "async/buffer_groups": len(self.buffer), "async/outstanding_groups": self.outstanding,
            "async/window_budget": self.budget, "async/rollout_version": self.rollout_version,
            "async/dropped_samples": self.stats["dropped"], "async/rollout_restarts": self.stats["restarts"],
            "async/reward_restarts": self.stats["reward_restarts"], "async/weight_syncs": self.iv["syncs"],
            "perf/rollout_util": min(1.0, self.iv["gen_s"] / max(interval * workers, 1e-9)),
            "perf/learner_util": min(1.0, out["metrics"].get("time/train_s", learner_s) / max(interval, 1e-9)),
            "perf/weight_sync_mb": self.iv["sync_mb"],
            "time/rollout_s": self.iv["gen_s"], "time/learner_s": learner_s, "time/weight_sync_s": self.iv["sync_s"],
        })
        self.log.log(step + 1, m, lags, prov if self.cfg.trainer.provenance else None)  # 1-based, as the bar
        self.progress.update(step, m)
        self._reset_interval()

    def _outstanding_items(self) -> list:
        """Groups started and not trained, not in the buffer: in generate/score calls, or waiting to be re-issued."""
        items = list(self.pending)
        for rec in self.inflight.values():
            if isinstance(rec, (Generating, Scoring)):
                items += rec.groups
        return [list(x) for x in items]

    def _save(self) -> None:
        buffer = list(self.buffer)
        items = self._outstanding_items()
        state = {"data": self.stream.state_dict(),
                 "async": {"next_group": self.next_group, "calls": self.calls, "in_flight": items,
                           "buffer_groups": len(buffer), "buffer_uids": [int(g["uid"][0]) for g in buffer],
                           **self.stats}}
        save_checkpoint(self.cfg, self.run_dir, self.actors, state, self.step,
              extra=lambda path: torch.save(buffer, os.path.join(path, BUFFER_FILE)))

    def _restore(self, state: dict) -> None:
        self.stream.load_state_dict(state["data"])
        a = state["async"]
        self.next_group, self.calls = a["next_group"], a["calls"]
        self.stats.update({k: a[k] for k in self.stats if k in a})
        self.pending = deque(Group(*x) for x in a["in_flight"])
        path = os.path.join(ckpt.ckpt_root(self.run_dir), ckpt.tag_for(state["step"]), BUFFER_FILE)
        self.buffer = deque(torch.load(path, weights_only=False)) if a["buffer_groups"] else deque()
        self.outstanding = len(self.pending) + len(self.buffer)
        self.progress.print(f"async state restored: {plural(len(self.buffer), 'buffered group')}, "
                            f"{plural(len(self.pending), 'group')} to re-issue")

    def _write_pids(self) -> None:
        """run_dir/actors.json: the process id of every actor (for operators, and the fault tests)."""
        limit = self.cfg.trainer.actor_timeout_s
        pids = {"driver": os.getpid(),
                "rollout": get_within([w.status.remote() for w in self.actors.rollout],
                                      [f"rollout worker {i} (status)" for i in range(len(self.actors.rollout))], limit),
                "learner": get_within(self.actors.learner.info.remote(), "the learner (info)", limit).get("pid")}
        pids["rollout"] = [s["pid"] for s in pids["rollout"]]
        with open(os.path.join(self.run_dir, "actors.json"), "w") as f:
            json.dump(pids, f)

    def _describe(self) -> str:
        return (f"step {self.step}, buffer {len(self.buffer)}, outstanding {self.outstanding}, budget {self.budget}, "
                f"push {self.push and self.push.stage.value}, busy {self.busy}, pending {len(self.pending)}")
